"""HQQ: transformers' `HqqConfig` arguments. HQQ configures per layer *tag* (`self_attn.q_proj`, shared by all
blocks), is always asymmetric and packs 2/3/4/8 bits (the `hqq` layout's); a config whose blocks differ per tag maps
each tag to its most precise format."""

from __future__ import annotations

import json
from pathlib import Path

from bitalloc.formats import KEEP_BITS, Format
from bitalloc.quantizers.layouts import HQQ_BITS

from ..base import Layer, Placement, from_ggml, register
from ..python import PythonRuntime


def hqq_tag(name: str) -> str:
    """transformers' HQQ layer tag: the module name without `model`, `layers` and block indices."""
    return ".".join(p for p in name.split(".") if p not in ("model", "layers") and not p.isnumeric())


@register("hqq")
class HQQ(PythonRuntime):
    summary = "HQQ 2/3/4/8-bit, groups 64/128, asymmetric; one format per layer tag (transformers' HqqConfig)"
    methods = ("hqq",)
    bits = HQQ_BITS
    symmetric = False
    library = "hqq"
    export_file = "HqqConfig arguments (JSON)"
    artifact = "folder"  # HQQ's saved model holding the levels (`build`): qmodel.pt, config.json, tokenizer
    file_sized = True  # the front's bytes are that folder's (`saved.folder_bytes`)
    experts_why = "HQQ quantizes nn.Linear modules, and transformers keeps experts as fused 3-D parameters"

    def unstorable(self, fmt) -> str:
        return "" if fmt.scale_dtype == "float16" else f"HQQ's saved model keeps float16 scales, not {fmt.scale_dtype}"

    def file_bytes(self, ws):
        from .saved import folder_bytes

        return folder_bytes(ws)

    def write_artifact(self, ws, picked, card, out) -> dict:
        """HQQ's saved model of the point, written by HQQ's own serializer around the job's levels (`venv.write`):
        the model handed over as a float folder, each quantized layer's codes, scales and zero points beside it."""
        import tempfile

        from safetensors.torch import save_file

        from bitalloc.kernels.packed import unpack

        from ..base import layers_of
        from ..python import as_folder

        doc = picked.config
        text, _ = self.export(layers_of(doc), doc.model.type, nearest=False, quantizers=doc.quantizers)
        levels = {}
        for name, fmt in doc.formats().items():
            if fmt.quantized:
                q = unpack(ws.levels.read(name, fmt))
                scale = q.scales.float()
                levels.update({f"{name}.codes": q.codes.contiguous(), f"{name}.scale": q.scales.contiguous(),
                               f"{name}.zero": (-q.zeros.float() / scale).to(q.scales.dtype).contiguous()})
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            model_dir = as_folder(ws, work / "model")
            (work / "export.json").write_text(text)
            save_file(levels, str(work / "levels.safetensors"))
            self._run_venv("write", str(model_dir), str(work / "export.json"), str(work / "levels.safetensors"),
                           str(out))
        if ws.model.tokenizer is not None:
            ws.model.tokenizer.save_pretrained(out)
        (out / "README.md").write_text(card.markdown(self.name))
        return {"levels": len(levels) // 3}

    def tie_key(self, name: str) -> str:
        return hqq_tag(name)  # one format per layer tag across blocks

    def place(self, layers, model_type) -> dict[str, Placement]:
        by_tag: dict[str, list[Layer]] = {}
        for l in layers:
            by_tag.setdefault(hqq_tag(l.name), []).append(l)
        placed = {}
        for tag, members in by_tag.items():
            own = [self._one(l) for l in members]
            quantized = [p for p in own if p.value is not None]
            if not quantized:
                placed.update({l.name: Placement(None) for l in members})
                continue
            bits = max(p.value["nbits"] for p in quantized)
            group = min(p.value["group_size"] for p in quantized)
            shared = {"nbits": bits, "group_size": group}
            for l, p in zip(members, own):
                if p.value == shared:
                    placed[l.name] = p
                else:
                    why = p.why or (f"HQQ sets one format per layer tag; {tag} differs across blocks" if p.value
                                    else f"HQQ cannot keep one {tag} in 16 bits while quantizing the others")
                    placed[l.name] = Placement(shared, False, why)
        return placed

    def format_of(self, value) -> Format:
        return Format(KEEP_BITS) if value is None else Format(value["nbits"], value["group_size"], False, "float16",
                                                              "hqq")

    def _one(self, layer: Layer) -> Placement:
        f = layer.fmt
        if not f.quantized:
            return Placement(None)
        if f.ggml:
            near = from_ggml(layer, "HQQ", HQQ_BITS, 32).value
            return Placement({"nbits": near["bits"], "group_size": 32}, False, f"llama.cpp's {f.ggml} has no HQQ form")
        bits = min(b for b in HQQ_BITS if b >= f.bits)
        group = max(d for d in range(1, f.group_size + 1) if layer.in_features % d == 0)
        value = {"nbits": bits, "group_size": group}
        reasons = [r for r, bad in ((f"HQQ has no {f.bits}-bit", bits != f.bits),
                                    (f"HQQ groups must divide the row ({layer.in_features})", group != f.group_size),
                                    ("HQQ is asymmetric (scale and zero point)", f.symmetric),
                                    (f"HQQ keeps scales in the compute dtype, not {f.scale_dtype}",
                                     f.scale_dtype == "float32")) if bad]
        return Placement(value, not reasons, "; ".join(reasons))

    def render(self, layers, placed, model_type, quantizers) -> str:
        dynamic, skip = {}, ["lm_head"]
        for l in layers:
            tag = hqq_tag(l.name)
            if placed[l.name].value is None:
                skip.append(tag)
            else:
                dynamic[tag] = placed[l.name].value
        doc = {"dynamic_config": dynamic, "skip_modules": sorted(set(skip) - set(dynamic))}
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"
