"""rotsparse as a transformers quantization method: ``AutoModelForCausalLM.from_pretrained`` builds the sparse model.

Importing rotsparse registers `RotsparseConfig` (``quant_method: "rotsparse"``) and `RotsparseHfQuantizer` with
transformers' quantizer registry (that registration is the only global effect). Then

* ``AutoModelForCausalLM.from_pretrained(saved_dir)`` (also ``pipeline(model=saved_dir)``, lm-eval's
  ``pretrained=saved_dir``, any ``device_map``) loads a folder written by `rotsparse.save` as the sparse model:
  the checkpoint is checked against the plan (`rotsparse.io.check_checkpoint`) before any weight is read, the
  residual/output rotation buffers the plan implies (and, for a quantized plan, the quantized Top-K linears with
  their int8 / int4 buffers) are declared on the empty model so that they load like weights, and after loading every site linear becomes a `TopKLinear` with the plan's K, the lm_head gets the
  decode kernel and the plan is attached as ``model.rotsparse_plan`` -- exactly what `rotsparse.load` builds.
* ``from_pretrained(dense, quantization_config=RotsparseConfig(method="topk", sparsity=0.4))`` sparsifies a
  dense model after loading with the calibration-free method.

The saved config.json keeps the plan under ``"rotsparse"`` (`rotsparse.plan.CONFIG_KEY`); its
``quantization_config`` is ``{"quant_method": "rotsparse", "format_version": 1, "plan_key": "rotsparse"}``
(`rotsparse.plan.quantization_section`, written by `rotsparse.plan.attach_plan`), a pointer to that section.
Without rotsparse, transformers does not know the method and says so (see docs/integration.md).
"""

from __future__ import annotations

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from .api import sparsify
from .config import SparsifyConfig
from .families import get_family
from .io import check_checkpoint, declare_rotations
from .plan import CONFIG_KEY as PLAN_KEY
from .plan import FORMAT_VERSION, QUANT_METHOD, attach_plan, plan_from_section
from .runtime import declare_quantized, install_topk

__all__ = ["QUANT_METHOD", "RotsparseConfig", "RotsparseHfQuantizer"]


def _forget_earlier_registration() -> None:
    """Drop the classes an earlier import of this module registered (a fresh re-import of the package, or
    ``importlib.reload``), so that registering again replaces them; another package's ``"rotsparse"`` entry is
    left in place for transformers to refuse."""
    for mapping in (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING):
        if getattr(mapping.get(QUANT_METHOD), "__module__", None) == __name__:
            del mapping[QUANT_METHOD]


_forget_earlier_registration()


@register_quantization_config(QUANT_METHOD)
class RotsparseConfig(QuantizationConfigMixin):
    """``quantization_config`` of a rotsparse model.

    ``RotsparseConfig()``: a saved sparse model; its plan is the config.json section named `plan_key`.
    ``RotsparseConfig(method="topk", sparsity=0.4, **fields)``: sparsify a dense model while loading it
    (`SparsifyConfig` fields; only the calibration-free ``topk``: calibrated methods need text and a
    tokenizer, use `rotsparse.sparsify`).
    format_version: the rotsparse format the saved folder was written in; another version is refused.
    """

    def __init__(self, method: str | None = None, sparsity: float | None = None, *,
                 format_version: int = FORMAT_VERSION, plan_key: str | None = None, **fields):
        fields.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        if format_version != FORMAT_VERSION:
            raise ValueError(f"rotsparse format version {format_version!r} is not supported by this rotsparse (it "
                             f"reads version {FORMAT_VERSION}); upgrade rotsparse or re-sparsify the model")
        self.format_version = format_version
        requested = method is not None or sparsity is not None or fields
        if requested and plan_key is not None:
            raise ValueError("RotsparseConfig: pass either sparsify settings (method, sparsity, ...) or plan_key")
        if not requested:
            self.plan_key = plan_key or PLAN_KEY
            return
        settings = SparsifyConfig(**{key: value for key, value in
                                     (("method", method or "topk"), ("sparsity", sparsity)) if value is not None},
                                  **fields)
        if settings.method != "topk":
            raise ValueError(f"RotsparseConfig(method={settings.method!r}) cannot calibrate while loading (it needs "
                             f"text and a tokenizer): load the dense model and call rotsparse.sparsify, or use "
                             f"method='topk'")
        self.method, self.sparsity = settings.method, settings.sparsity
        for key in fields:  # further SparsifyConfig fields, stored flat so that to_dict/from_dict round-trip
            setattr(self, key, getattr(settings, key))

    @property
    def sparsify_config(self) -> SparsifyConfig | None:
        """The settings to sparsify with after loading; None for a saved sparse model."""
        if getattr(self, "plan_key", None) is not None:
            return None
        return SparsifyConfig.from_dict({key: value for key, value in self.__dict__.items()
                                         if key not in ("quant_method", "format_version")})


@register_quantizer(QUANT_METHOD)
class RotsparseHfQuantizer(HfQuantizer):
    """Builds the sparse model inside ``from_pretrained`` (see the module docstring)."""

    requires_calibration = False

    def _saved_plan(self, model):
        """The plan in the loaded config.json (None when the folder is a dense model)."""
        key = getattr(self.quantization_config, "plan_key", None) or PLAN_KEY
        section = getattr(model.config, key, None)
        return None if section is None else plan_from_section(section, f"{model.config.name_or_path}/config.json")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        """Check the checkpoint against the plan; declare the rotation buffers on the empty (meta) model."""
        plan = self._saved_plan(model)
        if plan is None:
            if self.quantization_config.sparsify_config is None:
                raise ValueError(f"{model.config.name_or_path}: quantization_config names rotsparse, but config.json "
                                 f"has no {PLAN_KEY!r} plan section")
            return model
        if self.quantization_config.sparsify_config is not None:
            raise ValueError(f"{model.config.name_or_path} is already sparsified by rotsparse; load it without a "
                             f"RotsparseConfig")
        self.plan = plan
        if plan.config.weight_bits is not None:
            declare_quantized(get_family(model), plan)
        self.rotations = check_checkpoint(model, plan, checkpoint_files or [])
        declare_rotations(model, self.rotations)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        """Install Top-K with the plan's K (or sparsify a dense model with ``topk``); attach the plan."""
        settings = self.quantization_config.sparsify_config
        if settings is not None:
            sparsify(model, config=settings, progress=False)  # sets config.quantization_config to the saved form
        else:
            install_topk(get_family(model), self.plan)
            attach_plan(model, self.plan)
        return model.eval()

    def is_serializable(self):
        """A loaded sparse model saves again (`rotsparse.save` or ``save_pretrained``)."""
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # TopKLinear trains with a straight-through estimator (rotsparse.recovery)
