"""`tapestry generate`: text with images inside sentences in, an interleaved Document out."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from tapestry.errors import DocumentError, TapestryError


def _parse_images(values: list[str]) -> list | dict:
    """`--image a.png` (bound in order) or `--image cat=a.png` (bound by name); not both."""
    from tapestry.storage import load_image

    named = [v for v in values if "=" in v and not Path(v).exists()]
    if named and len(named) != len(values):
        raise TapestryError("--image: give all images as NAME=PATH or none of them")
    if named:
        out: dict = {}
        for value in values:
            name, path = value.split("=", 1)
            if name in out:
                raise TapestryError(f"--image: duplicate image name {name!r}")
            out[name] = load_image(path)[0]
        return out
    return [load_image(v)[0] for v in values]


def _input_document(prompt: str, images: list[str], doc_id: str):
    from tapestry.document import from_markup
    from tapestry.storage import load_folder

    path = Path(prompt)
    if len(prompt) < 4096 and (path.is_dir() or path.suffix == ".json") and path.exists():
        if images:
            raise TapestryError("--image is for markup prompts; a Document brings its own images")
        return load_folder(path)
    return from_markup(prompt, _parse_images(images), id=doc_id, source="<prompt>")


WRITER = "tapestry generate"


def generate_command(
    prompt: str = typer.Argument(..., help="Markup like 'A \\[img1] sits left of a \\[img2].', or a Document folder / .json."),
    image: list[str] = typer.Option([], "--image", "-i", help="An image for the next \\[imgK] slot (or NAME=PATH for <img:NAME/>). Repeat."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write: doc.json, images/, index.html."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out even if it holds files generate did not write."),
    checkpoint: str = typer.Option("default", help="'default' (the embedded ToyWorld model) or a pipeline folder."),
    seed: Optional[int] = typer.Option(None, help="Random seed (default: the checkpoint's, 0)."),
    steps: Optional[int] = typer.Option(None, help="Denoising steps per image."),
    guidance: Optional[str] = typer.Option(None, help="none | cfg | illume | inset | bagel | duetgen."),
    scale: Optional[float] = typer.Option(None, help="cfg, duetgen: guidance scale."),
    gamma_txt: Optional[float] = typer.Option(None, help="illume: text scale γ_txt."),
    gamma_img: Optional[float] = typer.Option(None, help="illume: image scale γ_img."),
    s1: Optional[float] = typer.Option(None, help="inset: text-balance scale s1."),
    s2: Optional[float] = typer.Option(None, help="inset: overall scale s2."),
    text_scale: Optional[float] = typer.Option(None, help="bagel: text scale."),
    image_scale: Optional[float] = typer.Option(None, help="bagel: image scale."),
    renorm: Optional[str] = typer.Option(None, help="bagel: none | global | channel | text_channel."),
    max_images: Optional[int] = typer.Option(None, help="Stop drawing after this many images."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Budget of generated text tokens."),
    temperature: Optional[float] = typer.Option(None, help="Text sampling temperature (0 = greedy)."),
    top_p: Optional[float] = typer.Option(None, help="Text nucleus sampling mass."),
    size: Optional[int] = typer.Option(None, help="Side of generated images in pixels (default: the checkpoint's)."),
    doc_id: str = typer.Option("prompt", "--id", help="Id of the Document made from a markup prompt."),
    json_output: bool = typer.Option(False, "--json", help="Print the final summary as one JSON object."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No streamed text or progress bars."),
) -> None:
    """Generate an interleaved Document: text and images, as many as the model decides.

    When the input has target images or text (a Document with role "target"), they are filled
    in place; otherwise the model writes on after the prompt and emits images where it chooses.
    Exit code 0 on success, 2 on bad input (nothing is written to --out then).

    Example:

        tapestry generate "A \\[img1] sits top-left of a large \\[img2]." --image a.png --image b.png --out out/ --seed 0
    """
    from tapestry.atomic import check_output_dir
    from tapestry.infer.pipeline import Pipeline
    from tapestry.storage import Loaded, save_folder
    from tapestry.viewer import render_page

    err = Console(stderr=True, soft_wrap=True, highlight=False)
    try:
        doc = _input_document(prompt, image, doc_id)
        scales = {k: v for k, v in dict(scale=scale, gamma_txt=gamma_txt, gamma_img=gamma_img, s1=s1, s2=s2,
                                        text_scale=text_scale, image_scale=image_scale, renorm=renorm).items()
                  if v is not None}
        pipe = Pipeline.from_pretrained(checkpoint)
        rule = guidance or pipe.defaults.guidance
        if scales and guidance is None and rule == "none":
            raise TapestryError(f"guidance scales {sorted(scales)} given without --guidance")
        options = pipe.options(
            seed=seed, steps=steps, guidance=guidance,
            guidance_scales=scales if (scales or guidance) else None,
            max_images=max_images, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            image_size=(size, size) if size else None,
        )
        check_output_dir(out, WRITER, overwrite)  # before any generation: a refused --out costs nothing
    except DocumentError as e:
        for problem in e.problems:
            err.print(f"[bold red]error:[/] {escape(str(problem))}")
        raise typer.Exit(2)
    except (TapestryError, ValueError) as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}")
        raise typer.Exit(2)

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.perf_counter()
    console = Console(stderr=True)
    final = None
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=quiet) as progress:
        bars: dict[int, int] = {}
        for event in pipe.engine.stream(doc, options):
            if event.type == "text_delta" and not quiet:
                progress.console.print(event.text, end="", soft_wrap=True, highlight=False, markup=False)
            elif event.type == "image_started":
                bars[event.index] = progress.add_task(f"image {event.index + 1}", total=event.steps)
            elif event.type == "image_progress":
                progress.update(bars[event.index], completed=event.step)
            elif event.type == "image_done":
                progress.remove_task(bars.pop(event.index))
                if not quiet:
                    progress.console.print(f"[image {event.index + 1}]", end=" ", highlight=False, markup=False)
            elif event.type == "done":
                final = event
    if not quiet:
        console.print()
    result = final.document
    result.meta["generation"].update(checkpoint=pipe.checkpoint, checkpoint_hash=pipe.checkpoint_hash)
    page = render_page([Loaded(str(out / "doc.json"), result)], title=f"tapestry generate — {result.id}")
    save_folder(result, out, extra_files={"index.html": page.encode("utf-8")}, overwrite=overwrite, writer=WRITER)
    summary = {
        "out": str(out),
        "id": result.id,
        "stop_reason": final.stop_reason,
        "images": result.meta["generation"]["new_images"],
        "text": " ".join(s.text.strip() for s in result.segments if s.type == "text" and s.role == "target"),
        "seconds": round(time.perf_counter() - started, 3),
        "timings": {k: round(v, 3) for k, v in final.timings.items()},
        "seed": options.seed,
        "checkpoint": pipe.checkpoint,
        "checkpoint_hash": pipe.checkpoint_hash,
    }
    if json_output:
        print(json.dumps(summary))
    elif not quiet:
        print(f"wrote {out}/doc.json, {summary['images']} image(s), {out}/index.html "
              f"({summary['seconds']} s, stop: {final.stop_reason})")
    sys.stdout.flush()
