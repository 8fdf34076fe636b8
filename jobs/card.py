"""The model card an artifact carries: what people publish beside a quantized model, from the job's own records —
the base model and its hash, the point (average bits, bytes, formats per kind of layer), the loss and quality
bitalloc measured and, where `verify` ran the point in the runtime, what the runtime measured, on which held-out
data, from which job spec, by which bitalloc. A folder gets it as README.md, a GGUF file as `bitalloc.*` keys."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from bitalloc import __version__


@dataclass(frozen=True)
class Card:
    base_model: str
    base_model_sha256: str
    job_spec_sha256: str
    point: str
    avg_bits: float
    bytes: int
    bytes_of: str  # whose bytes `bytes` are: a runtime's file, or bitalloc's count
    formats: dict[str, dict[str, int]]  # kind of layer -> format -> layers
    loss_key: str
    loss: float
    quality_key: str
    quality: float
    data: str
    runtime_measured: dict[str, float]  # runtime -> its loss, quality (as `verify` recorded them)
    nearest: tuple[str, ...] = ()  # built with --nearest: the layers at the runtime's nearest format instead

    def entries(self) -> dict[str, str | int | float]:
        """GGUF metadata keys."""
        out = {"bitalloc.version": __version__, "bitalloc.base_model": self.base_model,
               "bitalloc.base_model.sha256": self.base_model_sha256, "bitalloc.job_spec.sha256": self.job_spec_sha256,
               "bitalloc.point": self.point, "bitalloc.avg_bits": self.avg_bits, "bitalloc.bytes": self.bytes,
               "bitalloc.bytes_of": self.bytes_of, "bitalloc.formats": self.formats_line(),
               f"bitalloc.{self.loss_key}": self.loss, f"bitalloc.{self.quality_key}": self.quality,
               "bitalloc.data": self.data}
        out.update({f"bitalloc.verify.{k}": v for k, v in self.runtime_measured.items()})
        if self.nearest:
            out["bitalloc.nearest"] = "; ".join(self.nearest)
        return out

    def formats_line(self) -> str:
        return "; ".join(f"{kind}: " + ", ".join(f"{f} x{n}" for f, n in sorted(fmts.items()))
                         for kind, fmts in sorted(self.formats.items()))

    def markdown(self, runtime: str) -> str:
        rows = "\n".join(f"| {kind} | " + ", ".join(f"{f} × {n}" for f, n in sorted(fmts.items())) + " |"
                         for kind, fmts in sorted(self.formats.items()))
        measured = "\n".join(f"| {k} | {v:.6g} |" for k, v in self.runtime_measured.items()) or "| not run | |"
        how = ("every searched layer is the level bitalloc measured, as the runtime stores it." if not self.nearest
               else f"built with `--nearest`: {len(self.nearest)} layers are at the runtime's nearest format, made by "
                    f"its own quantizer, not the levels bitalloc measured, so this model is not the point whose "
                    f"figures follow (`bitalloc verify --nearest` measures it): " + "; ".join(self.nearest) + ".")
        return (f"# {self.base_model}, {self.point} ({self.avg_bits:.3f} average bits) for {runtime}\n\n"
                f"Quantized by bitalloc {__version__}: {how}\n\n"
                f"- base model: `{self.base_model}` (content sha256 `{self.base_model_sha256}`)\n"
                f"- bytes: {self.bytes:,} ({self.bytes_of})\n"
                f"- bitalloc measured: {self.loss_key} {self.loss:.6g}, {self.quality_key} {self.quality:.6g} on "
                f"{self.data}\n"
                f"- job spec sha256: `{self.job_spec_sha256}`\n\n"
                f"| kind of layer | formats |\n|---|---|\n{rows}\n\n"
                f"Measured in the runtime by `bitalloc verify`:\n\n| figure | value |\n|---|---|\n{measured}\n")


def layer_kind(name: str) -> str:
    """A layer's kind: its name without block numbers (model.layers.3.mlp.down_proj -> model.layers.N.mlp.down_proj)."""
    return re.sub(r"\.\d+\.", ".N.", name)


def model_card(picked, nearest: list[str] = ()) -> Card:
    """The card of a picked point (`jobs.verify.Picked`); `nearest`: the layers `build --nearest` changed."""
    front, point, doc = picked.front, picked.point, picked.config
    metric = front.metric.metric()
    kinds: dict[str, Counter] = {}
    for name, fmt in doc.formats().items():
        kinds.setdefault(layer_kind(name), Counter())[fmt.name] += 1
    data_source = picked.spec.data.source
    source = data_source if isinstance(data_source, str) else ", ".join(map(str, data_source))
    measured = {}
    for r in front.runtime_points:
        if r.kind == "point" and r.config == point.config:
            measured.update({f"{r.runtime}.{metric.loss}": r.loss, f"{r.runtime}.{metric.quality}": r.quality})
    return Card(front.model.source, front.model.content_hash, doc.job_spec_hash, point.label, point.avg_bits,
                point.bytes, _whose(front.model.bytes_of),
                {k: dict(v) for k, v in kinds.items()}, metric.loss, point.loss, metric.quality, point.quality,
                f"{front.data.evaluation_tokens:,} held-out tokens of {source} ({front.data.hash})",
                measured, tuple(nearest))


def _whose(runtime: str | None) -> str:
    if not runtime:
        return "bitalloc's count"
    from bitalloc.runtimes import get_runtime

    return f"{runtime}'s {'file' if get_runtime(runtime).artifact == 'file' else 'folder, model card aside'}"
