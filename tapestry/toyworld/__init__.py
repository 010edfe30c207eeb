"""ToyWorld: a procedural world whose images a computer can judge exactly (DESIGN §10)."""
