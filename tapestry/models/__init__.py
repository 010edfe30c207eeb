"""Model families (`mot`, later `duet`, `mmi`) and the pieces they share (`common`)."""
