"""The Python runtimes' verify: the runtime driven as a subprocess in its own environment (its `venv.py build`), the
model handed to it as a transformers folder, the exported file applied by the runtime's own code, each quantized
layer's weight as the runtime dequantizes it measured and compared with the job's levels (`points.weights_point`)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from bitalloc.errors import BitallocError

from . import venv
from .base import Runtime
from .points import weights_point

ROOT = Path(__file__).resolve().parent.parent


def runtimes_python(runtime: Runtime) -> str:
    """The Python of the runtimes' environment (`BITALLOC_RUNTIMES_PYTHON`, else the checkout's `.venv-runtimes`),
    checked to import the runtime."""
    python = os.environ.get("BITALLOC_RUNTIMES_PYTHON") or str(ROOT / ".venv-runtimes" / "bin" / "python")
    if not Path(python).is_file():
        raise BitallocError("--runtime", f"{runtime.name} is not installed: no {python}; `./dev test` builds "
                                         f".venv-runtimes once, or set BITALLOC_RUNTIMES_PYTHON to a Python with "
                                         f"{runtime.library}")
    done = subprocess.run([python, "-c", f"import {runtime.library}"], capture_output=True, text=True)
    if done.returncode:
        raise BitallocError("--runtime", f"{runtime.name} is not installed in {python} (import {runtime.library} "
                                         f"fails)")
    return python


def as_folder(ws, folder: Path) -> Path:
    """The loaded model as a transformers checkpoint folder (a GGUF source is loaded dequantized, and transformers
    will not save it as it is: its config without the GGUF quantization note, its weights as loaded)."""
    import copy

    from safetensors.torch import save_model

    folder.mkdir(parents=True)
    config = copy.deepcopy(ws.model.module.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    save_model(ws.model.module, str(folder / "model.safetensors"), metadata={"format": "pt"})
    ws.model.tokenizer.save_pretrained(folder)
    return folder


class PythonRuntime(Runtime):
    """A runtime bitalloc drives in the runtimes' environment to build the point with the runtime's own code."""

    builds = True

    def prepare(self) -> None:
        runtimes_python(self)

    def moe_notes(self, layers) -> list[str]:
        """vLLM's fused MoE runs one scheme per MoE layer: a block whose experts' projections differ says so."""
        blocks: dict[str, set] = {}
        for l in layers:
            if l.experts:
                blocks.setdefault(l.name.rpartition(".")[0], set()).add(l.fmt)
        mixed = sorted(b for b, fmts in blocks.items() if len(fmts) > 1)
        return [f"{len(mixed)} MoE blocks (e.g. {mixed[0]}) have experts' projections in different formats: "
                f"{self.library} loads them, vLLM's fused MoE runs one scheme per MoE layer (search with "
                f"formats.target: {self.name}, which ties them)"] if mixed else []

    def unstorable(self, fmt) -> str:
        """Why the artifact cannot hold a level at `fmt` that the runtime places exactly ("": it can)."""
        return ""

    def unstored(self, layer, placement) -> str:
        from .folder import unstored

        return unstored(self, layer, placement)

    def check_buildable(self, doc) -> None:
        from .folder import check_storable

        if self.artifact:
            check_storable(self, doc)

    def checkpoint(self, layers, model_type, quantizers, names):
        """What its checkpoint folder holds for these layers beside the model's own tensors (`folder.Checkpoint`),
        the layers' saved names given (`folder.CheckpointNames`)."""
        raise NotImplementedError

    def names(self, module, layers):
        """The names its folder saves the model's tensors under (`folder.CheckpointNames`: transformers')."""
        from .folder import CheckpointNames

        return CheckpointNames(module, layers)

    def write_artifact(self, ws, picked, card, out: Path) -> dict:
        """Write the artifact of the picked point from the open job `ws`; returns its figures."""
        from .base import layers_of
        from .folder import write_checkpoint

        doc = picked.config
        names = self.names(ws.model.module, ws.layers)
        parts = self.checkpoint(layers_of(doc), doc.model.type, doc.quantizers, names)
        return write_checkpoint(ws, doc.formats(), out, parts, names, card.markdown(self.name))

    def file_bytes(self, ws):
        from .folder import folder_bytes

        return folder_bytes(self, ws) if self.file_sized else None

    def build(self, picked, card, out, stages):
        from bitalloc.jobs.runner import open_workspace

        ws = open_workspace(picked.spec, stages)
        with stages.stage(f"write the {self.name} checkpoint"):
            return self.write_artifact(ws, picked, card, out)

    def verify(self, ws, picked, text, work, presets, stages, recipe=False):
        if self.artifact and not recipe and self._stores(picked.config):
            return [self.verify_artifact(ws, picked, work, stages)]
        return [self.verify_recipe(ws, picked, text, work, stages)]

    def _stores(self, doc) -> bool:
        """Whether the artifact holds the point's levels as measured (else verify measures what its own quantizer
        makes of the recipe)."""
        try:
            self.check_buildable(doc)
        except BitallocError:
            return False
        return True

    def verify_artifact(self, ws, picked, work: Path, stages):
        """The artifact `bitalloc build` writes, loaded by the runtime's own loader in its environment, measured."""
        from safetensors.torch import load_file

        from bitalloc.jobs.card import model_card

        artifact, out = work / "artifact", work / "loaded"
        with stages.stage(f"{self.name}: write the artifact from the levels"):
            self.write_artifact(ws, picked, model_card(picked), artifact)
        out.mkdir()
        with stages.stage(f"{self.name}: load it"):
            self._run_venv("load", str(artifact), str(out))
        names = self.names(ws.model.module, ws.layers)  # what the runtime read back is named as saved
        weights, stored = names.as_units(load_file(str(out / "weights.safetensors")),
                                         json.loads((out / "stored.json").read_text()))
        files = sorted(p for p in artifact.rglob("*") if p.is_file())
        with stages.stage(f"{self.name}: measure"):
            point = weights_point(self.name, ws, picked, weights, stored, files)
        point.details["artifact"] = 1.0
        if picked.front.model.bytes_of == self.name:  # the front counts this folder's bytes: how close it came
            card = (artifact / "README.md").stat().st_size
            point.details.update(card_bytes=float(card),
                                 front_minus_folder_bytes=float(picked.point.bytes - (point.file_bytes - card)))
        return point

    def _run_venv(self, command: str, *args: str) -> str:
        done = subprocess.run([runtimes_python(self), str(venv.HERE / "venv.py"), command, self.name, *args],
                              capture_output=True, text=True)
        said = (done.stdout.strip().splitlines() or ["no output"])[-1]
        if done.returncode:
            raise BitallocError("--runtime", f"{self.name} could not {command} the point: {said}")
        return said

    def verify_recipe(self, ws, picked, text, work, stages):
        """The point as the runtime quantizes the model itself from the exported recipe."""
        from safetensors.torch import load_file, save_file

        doc = picked.config
        file = work / f"export-{self.name}.txt"
        file.write_text(text)
        with stages.stage(f"{self.name}: build the model"):
            model_dir = as_folder(ws, work / "model")
            calibration = work / "calibration.safetensors"
            save_file({"input_ids": ws.data.calibration.contiguous()}, str(calibration))
            out = work / "built"
            out.mkdir()
            self._run_venv("build", str(model_dir), str(file), str(out), str(calibration))
        weights = load_file(str(out / "weights.safetensors"))
        stored = json.loads((out / "stored.json").read_text())
        missing = sorted(set(n for n, f in doc.formats().items() if f.quantized) - set(weights))
        if missing:
            raise BitallocError("--runtime", f"{self.name} left {len(missing)} layers of the config unquantized, "
                                             f"e.g. {missing[0]}")
        files = sorted(p for p in (out / "checkpoint").rglob("*") if p.is_file()) if (out / "checkpoint").is_dir() \
            else [out / "weights.safetensors"]
        with stages.stage(f"{self.name}: measure"):
            point = weights_point(self.name, ws, picked, weights, stored, files)
        point.label = f"{point.label} (recipe)"
        return point
