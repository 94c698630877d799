"""Series and parallel bottleneck adapters (LLM-Adapters' AdapterH, AdapterP and Parallel).

``fa.patch(model, "series" | "parallel", bottleneck=256, activation="tanh", dropout=0.0,
scaling=1.0 | "learned", init="bert" | "zeros" | "mam_adapter", targets="auto", position="auto")``.

With ``A(z) = up(act(down(dropout(z))))``, ``s`` the scaling and ``W x + c`` the frozen linear
(LLM-Adapters ``peft/src/peft/tuners/bottleneck.py``, ``Linear.forward``):

- series on an MLP input projection ("mh_adapter"): ``y = W (x + s·A(x)) + c``;
- series on the MLP output projection ("output_adapter"): ``h = W x + c; y = h + s·A(h)``;
- parallel on any linear ("parallel_adapter"): ``y = W x + c + s·A(x)``.

Which side a series target is on comes from the architecture table's MLP rows
(``fastadapt.architectures``, the role of LLM-Adapters' ``TRANSFORMERS_MODELS_TO_ADAPTER_TYPE_MAPPING``);
for any other module pass ``position="input" | "output"`` (all targets) or a dict
``{module name or suffix: position}``. Targets: ``"auto"`` (series: MLP input + output projections =
AdapterH; parallel: the MLP projections), ``"mlp-output"`` (AdapterP), ``"mlp-input"``, ``"mlp"``, or
anything ``fa.patch`` accepts (a list of suffixes, a regex, ``"all-linear"``).

On disk: LLM-Adapters' layout (``adapter_config.json`` with ``peft_type: "BOTTLENECK"``,
``bottleneck_size``, ``non_linearity``, ``adapter_dropout``, ``use_parallel_adapter``,
``use_adapterp``, ``target_modules``, ``scaling``) plus ``fastadapt_positions`` (each module's side),
and ``adapter_model.safetensors`` with keys ``base_model.model.<module>.adapter_down.weight`` (b, d_in),
``.adapter_up.weight`` (d_out, b) and ``.adapter_scaling`` (1,) when learned. ``fa.load_adapter`` also
reads LLM-Adapters' own checkpoints (``adapter_model.bin``, read with ``torch.load(weights_only=True)``).
"""

from ..registry import Method, register_method
from . import model
from .config import PARALLEL_PRESETS, SERIES_PRESETS, BottleneckConfig, ParallelConfig, SeriesConfig
from .model import MERGE_ERROR

SERIES = Method.from_hooks(model, name="series", title="a series adapter", config_class=SeriesConfig,
                           presets=SERIES_PRESETS)
PARALLEL = Method.from_hooks(model, name="parallel", title="a parallel adapter", config_class=ParallelConfig,
                             presets=PARALLEL_PRESETS)
register_method(SERIES)
register_method(PARALLEL)

__all__ = ["MERGE_ERROR", "PARALLEL", "SERIES", "BottleneckConfig", "ParallelConfig", "SeriesConfig"]
