"""ONNX graphs: checked with ``onnx.checker``, matched against the input contract, served with ONNX Runtime.

A version of architecture ``onnx`` is ``model.onnx`` + ``manifest.json``; its manifest's ``onnx``
field names the graph's input, logits output and, for heatmaps, the feature-map output and the
initializer holding the classifier's weights, and says how the graph's output columns become the
task's logits (:class:`OutputMap`: a file whose ``--labels`` order differs from the task's is served
as it is, its columns permuted by name; a binary graph's single column of the other class is
negated, a two-column softmax is folded into one logit). Heatmaps come from CAM only: ``--cam-tensor NAME``
names the last feature map; when what follows it is global average pooling, reshapes, and one
Gemm or MatMul(+Add) giving the logits, Grad-CAM equals CAM from that tensor and the Gemm's weight,
so the tensor is added as a graph output. Anything else has no heatmaps, and the manifest says why.

:class:`OnnxClassifier` gives the graph the interface of a
:class:`~meddaemon.engine.architectures.ClassifierNet` (``forward``, ``forward_features``,
``cam_linear``), so the registry's self-test, the inference engine and the heatmaps use it as they
use a PyTorch network.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from meddaemon import __version__
from meddaemon.engine.importers.base import (
    ImportOptions,
    Source,
    contract_for,
    file_labels,
    provenance,
    version_name,
)
from meddaemon.engine.registry import (
    MANIFEST_FILE,
    ONNX_ARCHITECTURE,
    ONNX_FILE,
    Manifest,
    ManifestError,
    ModelRefused,
    probabilities,
    self_test_input,
    sha256_bytes,
)
from meddaemon.engine.tasks import InputContract, TaskSpec
from meddaemon.files import write_atomically

log = logging.getLogger(__name__)

MIN_OPSET = 7
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
#: ops between the feature map and the classifier that change neither values nor CAM
_PASSTHROUGH = ("Flatten", "Reshape", "Squeeze", "Dropout", "Identity")
_FLOAT = 1  # onnx.TensorProto.FLOAT
#: onnx.TensorProto's floating-point types: FLOAT, FLOAT16, DOUBLE, BFLOAT16, the FLOAT8, FLOAT6 and FLOAT4 kinds
_FLOATING_TYPES = frozenset({1, 10, 11, 16, 17, 18, 19, 20, 23, 24, 27, 28})


Provider = str | tuple[str, dict[str, Any]]


def choose_providers(available: Sequence[str], device: str | torch.device) -> tuple[list[Provider], str | None]:
    """ONNX Runtime's execution providers for ``device``, and why CUDA was not taken (or None).

    CUDA (on the device's index) then the CPU when the device is cuda and this onnxruntime has the
    CUDA execution provider; the CPU otherwise, with a sentence saying why when CUDA was asked for.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return [CPU_PROVIDER], None
    if CUDA_PROVIDER in available:
        return [(CUDA_PROVIDER, {"device_id": device.index or 0}), CPU_PROVIDER], None
    return [CPU_PROVIDER], (
        f"the device is {device} but this onnxruntime has no {CUDA_PROVIDER} (it has {', '.join(available)}; "
        "onnxruntime-gpu has it): ONNX Runtime runs the graph on the CPU"
    )


def provider_names(providers: Sequence[Provider]) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


def backend_name(providers: Sequence[str]) -> str:
    """What ``medcli models show`` and the daemon's log call the backend of an ONNX version."""
    return f"onnx (ONNX Runtime, {', '.join(providers)})"


def served_backend(device: str | torch.device) -> str:
    """The backend an ONNX version gets on ``device`` on this machine (without loading it)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnx (onnxruntime is not installed: the version cannot be served here)"
    providers, _ = choose_providers(ort.get_available_providers(), device)
    return backend_name(provider_names(providers))


@dataclass(frozen=True)
class OutputMap:
    """How the graph's output columns become the task's logits, in the task's label order.

    ``columns`` are the graph's columns taken, in the task's order (a permutation for multiclass and
    multilabel; for binary the positive class's column, then the negative's when ``fold``). ``fold``:
    a two-column softmax, whose positive-class logit is ``z_pos - z_neg``. ``negate``: a binary graph's
    single column is the other class's (``sigmoid(-z) = 1 - sigmoid(z)``).
    """

    width: int
    columns: tuple[int, ...]
    fold: bool = False
    negate: bool = False

    @classmethod
    def from_info(cls, info: Mapping[str, Any], num_outputs: int) -> OutputMap:
        """The map a manifest's ``onnx`` field records; the identity for versions saved before it existed."""
        columns = tuple(int(c) for c in info.get("columns", range(num_outputs)))
        fold, negate = bool(info.get("fold", False)), bool(info.get("negate", False))
        return cls(int(info.get("width", len(columns))), columns, fold, negate)

    def as_info(self) -> dict[str, Any]:
        return {"width": self.width, "columns": list(self.columns), "fold": self.fold, "negate": self.negate}

    def apply(self, z: Tensor) -> Tensor:
        """(N, width) graph outputs (logits, or log-probabilities) to (N, task outputs) logits."""
        picked = z[:, list(self.columns)]
        if self.fold:
            picked = picked[:, :1] - picked[:, 1:2]
        return -picked if self.negate else picked

    def conversion(self, labels_in_file: Sequence[str], spec: TaskSpec) -> list[str]:
        if self.fold:
            return [f"two-column softmax folded into one logit ({spec.labels[1]!r} minus {spec.labels[0]!r})"]
        if self.negate:
            return [f"single output of {spec.labels[0]!r} negated into the logit of {spec.labels[1]!r}"]
        if spec.kind == "binary" and self.width == 2:
            return [f"two sigmoid columns: that of {spec.labels[1]!r} kept, that of {spec.labels[0]!r} left out"]
        if list(self.columns) != list(range(self.width)):
            return [f"outputs reordered from the file's {list(labels_in_file)} to the task's"]
        return []


def output_map(
    spec: TaskSpec, labels_in_file: Sequence[str], width: int, where: str, sigmoids: bool = False
) -> OutputMap:
    """The map from a graph with ``width`` output columns in ``labels_in_file`` order to ``spec``'s logits;
    a width the task cannot take is ``class_count_mismatch`` naming both. A binary task's two columns
    are a softmax's, folded into one logit, unless a Sigmoid makes them (``sigmoids``): then the
    positive class's column is the one (folded, a 0.190 was served as 0.204)."""
    if spec.kind == "binary":
        positive, negative = labels_in_file.index(spec.labels[1]), labels_in_file.index(spec.labels[0])
        if width == 1:
            return OutputMap(1, (0,), negate=positive != 1)
        if width == 2 and sigmoids:
            return OutputMap(2, (positive,))
        if width == 2:
            return OutputMap(2, (positive, negative), fold=True)
        needs: object = "1 (binary: the sigmoid of the positive class) or 2 (softmax)"
    elif width == len(spec.labels):
        return OutputMap(width, tuple(labels_in_file.index(label) for label in spec.labels))
    else:
        needs = len(spec.labels)
    raise ModelRefused(
        "class_count_mismatch",
        f"output {where!r} has {width} classes but task {spec.name!r} ({spec.kind}, labels {list(spec.labels)}) "
        f"needs {needs}",
    )


class OnnxClassifier(nn.Module):
    """An ONNX Runtime session with the interface of a ClassifierNet; outputs are the task's logits."""

    def __init__(
        self, data: bytes, spec: Mapping[str, Any], kind: str, num_outputs: int, device: str | torch.device = "cpu"
    ) -> None:
        super().__init__()
        self.data = data
        self.session = _session(data, device)
        self.input_name = str(spec["input"])
        self.logits_name = str(spec["logits"])
        self.activation_name = spec.get("activation")
        self.single_image = bool(spec.get("single_image", False))
        self.probabilities_out = spec.get("outputs", "logits") == "probabilities"
        self.map = OutputMap.from_info(spec, num_outputs)
        #: probabilities of a softmax are turned into log-probabilities (logits up to a constant)
        self.softmax_out = kind == "multiclass" or self.map.fold
        self.linear: nn.Linear | None = None
        if self.activation_name is not None:
            weight = _initializer(data, str(spec["cam_weight"]))
            if spec.get("cam_weight_transposed"):
                weight = weight.T
            # the classifier's rows are the graph's columns: mapped as the logits are
            mapped = self.map.apply(torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)).T).T
            self.linear = nn.Linear(mapped.shape[1], mapped.shape[0], bias=False)
            with torch.no_grad():
                self.linear.weight.copy_(mapped)

    @property
    def cam_linear(self) -> nn.Linear | None:
        return self.linear

    @property
    def backend(self) -> str:
        """``onnx (ONNX Runtime, <the session's providers>)``."""
        return backend_name(self.session.get_providers())

    def place(self, device: str | torch.device) -> OnnxClassifier:
        """Run the graph with the providers ``device`` gets (CUDA when onnxruntime has it), logging a fallback."""
        self.session = _session(self.data, device)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, with_activation=False)[1]

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        activation, logits = self._run(x, with_activation=True)
        assert activation is not None
        return activation, logits

    def _run(self, x: Tensor, with_activation: bool) -> tuple[Tensor | None, Tensor]:
        names = [self.logits_name] + ([str(self.activation_name)] if with_activation else [])
        array = np.ascontiguousarray(x.detach().float().cpu().numpy())
        batches = [array[i : i + 1] for i in range(len(array))] if self.single_image else [array]
        results = [self.session.run(names, {self.input_name: b}) for b in batches]
        out = torch.from_numpy(np.concatenate([r[0] for r in results])).float().reshape(len(array), -1)
        if out.shape[1] != self.map.width:
            raise ModelRefused(
                "class_count_mismatch",
                f"output {self.logits_name!r} gives {out.shape[1]} columns where the manifest expects {self.map.width}",
            )
        if self.probabilities_out:
            out = torch.log(out) if self.softmax_out else torch.logit(out)
        activation = None
        if with_activation:
            activation = torch.from_numpy(np.concatenate([r[1] for r in results])).float().to(x.device)
        return activation, self.map.apply(out).to(x.device)


def _session(data: bytes, device: str | torch.device) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelRefused("unsupported_onnx", "onnxruntime is not installed") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    providers, fallback = choose_providers(ort.get_available_providers(), device)
    if fallback is not None:
        log.warning(fallback)
    try:
        session = ort.InferenceSession(data, options, providers=providers)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented
        raise ModelRefused("unsupported_onnx", f"ONNX Runtime cannot run the graph: {exc}") from None
    if CUDA_PROVIDER in provider_names(providers) and CUDA_PROVIDER not in session.get_providers():
        log.warning("ONNX Runtime could not start %s (see its log); it runs the graph on the CPU", CUDA_PROVIDER)
    return session


def load(data: bytes, manifest: Manifest) -> OnnxClassifier:
    """The served graph of a verified version (its hash checked by the caller)."""
    check_graph(data)
    return OnnxClassifier(data, manifest.onnx, manifest.kind, manifest.num_outputs).eval()


def graph_with_weights(path: Path) -> tuple[bytes, Any]:
    """The graph at ``path`` with every weight inside it. Exporters keep a graph's weights in a file
    beside it (``torch.onnx.export`` does by default since its dynamo exporter: ``model.onnx.data``);
    they are read from the graph's own folder, by onnx's loader, which refuses a location outside it,
    and embedded: the version registered is one file whose SHA-256 covers the weights, and nothing is
    read from the working directory. Returns the graph's bytes and the graph parsed."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    data = path.read_bytes()
    model = _parse(data)
    if not _keeps_weights_outside(model):
        return data, model
    try:
        load_external_data_for_model(model, str(path.parent))
    except Exception as exc:  # a missing file, a location outside the folder, a file cut short
        raise ModelRefused(
            "unreadable_weights", f"the weights the graph keeps in files beside it cannot be read: {exc}"
        ) from None
    size = model.ByteSize()
    if size >= onnx.checker.MAXIMUM_PROTOBUF:
        raise ModelRefused(
            "unsupported_onnx",
            f"the graph with its weights takes {size} bytes, over the {onnx.checker.MAXIMUM_PROTOBUF} "
            "one ONNX file can hold",
        )
    return model.SerializeToString(), model


def check_graph(data: bytes) -> Any:
    """The parsed graph, refused (``unsupported_onnx``) unless it parses, holds its weights, has a
    supported opset and passes ``onnx.checker``."""
    return check_parsed(_parse(data))


def check_parsed(model: Any) -> Any:
    """``check_graph`` for a graph already parsed."""
    import onnx

    if _keeps_weights_outside(model):
        raise ModelRefused(
            "unreadable_weights",
            "the graph keeps weights in other files (ONNX external data): import it from its own folder, "
            "with the files beside it",
        )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    newest = onnx.defs.onnx_opset_version()
    if opset is None or not MIN_OPSET <= opset <= newest:
        raise ModelRefused(
            "unsupported_onnx", f"opset {opset} is not supported (this meddaemon runs opsets {MIN_OPSET}..{newest})"
        )
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        raise ModelRefused("unsupported_onnx", f"onnx.checker refuses the graph: {exc}") from None
    return model


def _channels_last(dims: list[Any]) -> bool:
    """An image input laid out (batch, height, width, channels): its last axis a channel count and its
    first two an image's sides, fixed or dynamic (tf2onnx's ``['N', 'H', 'W', 1]`` was refused for a
    dynamic channel axis ``'H'``)."""
    _, a, b, c = dims
    return c in (1, 3) and all(not isinstance(side, int) or side > 3 for side in (a, b))


def _parse(data: bytes) -> Any:
    import onnx

    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf's DecodeError and others
        raise ModelRefused("unreadable_weights", f"not an ONNX graph (truncated or damaged?): {exc}") from None
    if not model.HasField("graph") or not model.opset_import:  # protobuf reads an empty file as an empty model
        raise ModelRefused("unreadable_weights", "not an ONNX graph: the file holds no graph (empty or damaged?)")
    return model


def _keeps_weights_outside(model: Any) -> bool:
    from onnx.external_data_helper import uses_external_data

    graphs = [model.graph]
    tensors = []
    while graphs:
        graph = graphs.pop()
        tensors += list(graph.initializer)
        tensors += [t for sparse in graph.sparse_initializer for t in (sparse.values, sparse.indices)]
        for node in graph.node:
            for attribute in node.attribute:
                tensors += [attribute.t, *attribute.tensors]
                graphs += [attribute.g, *attribute.graphs]
    return any(uses_external_data(t) for t in tensors)


def convert(source: Source, spec: TaskSpec, options: ImportOptions, out_dir: Path) -> Manifest:
    data, model = graph_with_weights(source.path)
    check_parsed(model)
    contract = contract_for(spec, options)
    labels_in_file = file_labels(spec, options)
    graph = model.graph
    _check_finite(graph)
    input_name, single_image = _check_input(graph, contract, spec)
    logits_name, width = _check_output(graph)
    activation = _check_outputs_option(graph, logits_name, options.outputs)
    width = spec.num_outputs if width is None else width
    mapping = output_map(spec, labels_in_file, width, logits_name, sigmoids=activation == "Sigmoid")
    info: dict[str, Any] = {
        "input": input_name,
        "logits": logits_name,
        "single_image": single_image,
        "outputs": options.outputs,
        **mapping.as_info(),
    }
    heatmaps_note = "none: no --cam-tensor was given (the last feature map before global pooling)"
    if options.cam_tensor is not None:
        found = _cam_head(graph, options.cam_tensor, logits_name)
        if isinstance(found, str):
            heatmaps_note = f"none: {found}"
        else:
            import onnx

            weight, transposed = found
            if options.cam_tensor not in {o.name for o in graph.output}:
                inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
                known = next((v for v in inferred if v.name == options.cam_tensor), None)
                shape = _dims(known) if known is not None else ["batch", None, None, None]
                graph.output.append(onnx.helper.make_tensor_value_info(options.cam_tensor, _FLOAT, shape))
            data = model.SerializeToString()
            info.update(activation=options.cam_tensor, cam_weight=weight, cam_weight_transposed=transposed)
            heatmaps_note = f"CAM from {options.cam_tensor}"
    return save_onnx_version(
        data,
        spec=spec,
        version=version_name(source, options),
        contract=contract,
        out_dir=out_dir,
        info=info,
        thresholds=options.thresholds,
        provenance=provenance(
            source,
            options,
            ["ONNX graph served as it is by ONNX Runtime", *mapping.conversion(labels_in_file, spec)],
            heatmaps=heatmaps_note,
            cam_tensor=options.cam_tensor,
            labels_in_file=labels_in_file,
        ),
    )


def _check_outputs_option(graph: Any, output: str, outputs: str) -> str | None:
    """A graph whose output a Softmax or Sigmoid makes gives probabilities: read as logits, the task's
    activation went over them a second time (a 0.97 served as 0.58) without a word. Returns that
    activation's op type (None where another node makes the output)."""
    producers = {name: node for node in graph.node for name in node.output}
    last = producers.get(output)
    while last is not None and last.op_type in (*_PASSTHROUGH, "Unsqueeze", "Cast") and last.input:
        last = producers.get(last.input[0])  # an exporter's Identity or Reshape after the activation
    if outputs == "logits" and last is not None and last.op_type in ("Softmax", "Sigmoid"):
        raise ModelRefused(
            "contract_conflict",
            f"output {output!r} comes from a {last.op_type}: the graph gives probabilities, not logits; "
            "pass --outputs probabilities",
        )
    return None if last is None or last.op_type not in ("Softmax", "Sigmoid") else str(last.op_type)


def _type_name(kind: int) -> str:
    from onnx import TensorProto

    return str(TensorProto.DataType.Name(kind)) if kind in TensorProto.DataType.values() else f"type {kind}"


def _check_finite(graph: Any) -> None:
    """Floating-point weights holding NaN or infinity are refused by name (``non_finite_weights``):
    the initializers, and the tensors of Constant nodes, in the graph and its subgraphs (an
    infinite weight in a Constant was registered: its self-test saw saturated, finite outputs)."""
    from onnx import numpy_helper

    bad = []
    for name, tensor in _weight_tensors(graph):
        if tensor.data_type not in _FLOATING_TYPES:
            continue
        array = numpy_helper.to_array(tensor)  # bfloat16, float8: ml_dtypes, which np.issubdtype calls no float
        if not bool(np.isfinite(array).all()):
            bad.append(name)
    if bad:
        raise ModelRefused(
            "non_finite_weights",
            f"{len(bad)} initializer(s) hold NaN or infinite values: {', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}",
        )


def _weight_tensors(graph: Any) -> Iterator[tuple[str, Any]]:
    """(name, TensorProto) of every weight the graph holds: initializers, sparse ones (their values),
    and Constant nodes' tensors, subgraphs (If, Loop, Scan) included."""
    from onnx import AttributeProto

    for init in graph.initializer:
        yield init.name, init
    for sparse in graph.sparse_initializer:
        yield sparse.values.name, sparse.values
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == AttributeProto.TENSOR:
                yield f"{node.name or node.op_type}.{attribute.name}", attribute.t
            elif attribute.type == AttributeProto.SPARSE_TENSOR:
                yield f"{node.name or node.op_type}.{attribute.name}", attribute.sparse_tensor.values
            elif attribute.type == AttributeProto.GRAPH:
                yield from _weight_tensors(attribute.g)
            elif attribute.type == AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _weight_tensors(subgraph)


def _dims(value_info: Any) -> list[int | str | None]:
    dims: list[int | str | None] = []
    for d in value_info.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dims


def _check_input(graph: Any, contract: InputContract, spec: TaskSpec) -> tuple[str, bool]:
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ModelRefused(
            "unsupported_onnx",
            f"the graph has {len(inputs)} inputs {[i.name for i in inputs]}; one image input is needed",
        )
    value = inputs[0]
    if value.type.tensor_type.elem_type != _FLOAT:
        raise ModelRefused(
            "unsupported_onnx",
            f"input {value.name!r} has element type {value.type.tensor_type.elem_type}, not float32 (1)",
        )
    dims = _dims(value)
    wanted = (contract.channels, contract.height, contract.width)
    if len(dims) != 4:
        raise ModelRefused(
            "unsupported_onnx",
            f"input {value.name!r} has shape {dims}, not (batch, channels, height, width) as the contract "
            f"{wanted} needs",
        )
    if _channels_last(dims) and dims[1] != contract.channels:
        raise ModelRefused(
            "contract_conflict",
            f"input {value.name!r} has shape {dims}: channels last (NHWC, as Keras and TensorFlow export), "
            "while meddaemon feeds (batch, channels, height, width); export the model with its input in that "
            "order (tf2onnx --inputs-as-nchw), or with a Transpose in front of it",
        )
    height, width = dims[2:]
    if isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0 and height != width:
        # the advice for each side in turn went in a circle: --image-size 256, then --image-size 224
        raise ModelRefused(
            "contract_conflict",
            f"input {value.name!r} takes images of {height}x{width} (height x width) but a contract here is "
            "square (--image-size N): export the model for a square input",
        )
    for axis, (have, want) in enumerate(zip(dims[1:], wanted, strict=True), start=1):
        what = ("channels", "height", "width")[axis - 1]
        if isinstance(have, int) and have > 0 and have != want:
            advice = (
                "meddaemon feeds 1 (grey) or 3 (RGB) channels"
                if axis == 1 and have not in (1, 3)
                else f"pass {'--channels' if axis == 1 else '--image-size'} {have} if the model was trained so"
            )
            raise ModelRefused(
                "contract_conflict",
                f"input {value.name!r} has {what} {have} but the input contract (task {spec.name!r}) has {want}; "
                + advice,
            )
        if axis == 1 and not (isinstance(have, int) and have > 0):
            raise ModelRefused(
                "unsupported_onnx",
                f"input {value.name!r} has a dynamic channel axis {have!r}, which the contract cannot satisfy",
            )
    batch = dims[0]
    if isinstance(batch, int) and batch > 1:
        raise ModelRefused(
            "unsupported_onnx", f"input {value.name!r} has a fixed batch of {batch}; 1 or a dynamic batch is needed"
        )
    return value.name, batch == 1


def _check_output(graph: Any) -> tuple[str, int | None]:
    """The graph's one (batch, classes) output: its name and its class count (None when dynamic)."""
    if len(graph.output) != 1:
        raise ModelRefused(
            "unsupported_onnx", f"the graph has {len(graph.output)} outputs; one (batch, classes) output is needed"
        )
    value = graph.output[0]
    dims = _dims(value)
    if len(dims) != 2:
        raise ModelRefused("unsupported_onnx", f"output {value.name!r} has shape {dims}, not (batch, classes)")
    kind = value.type.tensor_type.elem_type
    if kind not in _FLOATING_TYPES:  # an int64 label read as a logit: every image at 0.5 or more
        raise ModelRefused(
            "unsupported_onnx",
            f"output {value.name!r} holds {_type_name(kind)}, not scores: a floating-point output is needed",
        )
    width = dims[1]
    return value.name, width if isinstance(width, int) and width > 0 else None


def _cam_head(graph: Any, tensor: str, logits: str) -> tuple[str, bool] | str:
    """(weight initializer, transposed) when ``tensor`` -> global average pooling -> reshapes ->
    Gemm/MatMul(+Add) gives the logits (then perhaps a Sigmoid/Softmax); else why not, in words."""
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    if tensor not in produced:
        return f"the graph has no tensor {tensor!r}"
    initializers = {i.name for i in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_consumer(name: str) -> Any:
        found = consumers.get(name, [])
        return found[0] if len(found) == 1 else None

    node = only_consumer(tensor)
    if node is None or not _is_global_average_pool(node):
        what = "several layers" if node is None else node.op_type
        return f"{tensor!r} is followed by {what}, not global average pooling"
    node = only_consumer(node.output[0])
    while node is not None and node.op_type in _PASSTHROUGH:
        node = only_consumer(node.output[0])
    if node is None or node.op_type not in ("Gemm", "MatMul"):
        what = "several layers" if node is None else node.op_type
        return f"the pooled {tensor!r} goes to {what}, not one Gemm or MatMul"
    if len(node.input) < 2 or node.input[1] not in initializers:
        return f"the {node.op_type} after {tensor!r} has no constant weight"
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Gemm":
        if attrs.get("transA") is not None and attrs["transA"].i:
            return "the Gemm transposes its input (transA)"
        transposed = not (attrs.get("transB") is not None and attrs["transB"].i)
    else:
        transposed = True
    weight, out = node.input[1], node.output[0]
    nxt = only_consumer(out)
    if node.op_type == "MatMul" and nxt is not None and nxt.op_type == "Add":
        out, nxt = nxt.output[0], only_consumer(nxt.output[0])
    if out == logits or (nxt is not None and nxt.op_type in ("Sigmoid", "Softmax") and nxt.output[0] == logits):
        return weight, transposed
    return f"the {node.op_type} after {tensor!r} is not what gives the output {logits!r}"


def _is_global_average_pool(node: Any) -> bool:
    if node.op_type == "GlobalAveragePool":
        return True
    if node.op_type != "ReduceMean":
        return False
    axes = [list(a.ints) for a in node.attribute if a.name == "axes"]
    return bool(axes) and sorted(axes[0]) in ([2, 3], [-2, -1])


def _initializer(data: bytes, name: str) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(data)
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init).astype(np.float32)
    raise ModelRefused("bad_manifest", f"the graph has no initializer {name!r} for CAM")


def save_onnx_version(
    data: bytes,
    *,
    spec: TaskSpec,
    version: str,
    contract: InputContract,
    out_dir: Path,
    info: dict[str, Any],
    thresholds: Mapping[str, float] | None,
    provenance: dict[str, Any],
    self_test_seed: int = 0,
    self_test_batch: int = 2,
    self_test_atol: float = 1e-4,
) -> Manifest:
    """Write ``model.onnx`` and a manifest whose self-test the graph itself computed (ONNX Runtime, CPU)."""
    labels = list(spec.labels)
    fields: dict[str, Any] = {
        "task": spec.name,
        "version": version,
        "labels": labels,
        "kind": spec.kind,
        "architecture": ONNX_ARCHITECTURE,
        "input_contract": contract.as_dict(),
        "preprocessing": {},
        "thresholds": {label: 0.5 for label in labels} if thresholds is None else dict(thresholds),
        "training_data_fingerprint": f"imported:{provenance['sha256']}",
        "metrics": {},
        "sha256": sha256_bytes(data),
        "code_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "self_test": {
            "seed": self_test_seed,
            "batch": self_test_batch,
            "atol": self_test_atol,
            "expected_probabilities": [[0.0] * len(labels)] * self_test_batch,
        },
        "backend": "onnx",  # the graph itself, never re-exported
        "heatmaps": "activation" in info,
        "provenance": provenance,
        "onnx": info,
    }
    try:
        draft = Manifest.from_dict(fields)
    except ManifestError as exc:
        raise ModelRefused("bad_manifest", f"cannot save {spec.name}/{version}: manifest {exc}") from None
    graph = OnnxClassifier(data, info, spec.kind, spec.num_outputs)
    x = self_test_input(contract, self_test_seed, self_test_batch)
    with torch.inference_mode():
        probs = probabilities(graph(x), spec.kind)
        if draft.heatmaps:
            activation, _ = graph.forward_features(x)
            if activation.ndim != 4 or graph.cam_linear is None or activation.shape[1] != graph.cam_linear.in_features:
                raise ModelRefused(
                    "unsupported_onnx",
                    f"--cam-tensor {info['activation']!r} has shape {tuple(activation.shape)}, not (batch, "
                    "channels, h, w) with the classifier's input channels",
                )
    if not bool(torch.isfinite(probs).all()):
        raise ModelRefused("non_finite_output", "the graph gives NaN or infinite outputs on the self-test input")
    fields["self_test"]["expected_probabilities"] = probs.tolist()
    manifest = Manifest.from_dict(fields)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(out_dir / ONNX_FILE, data, durable=True)
    write_atomically(out_dir / MANIFEST_FILE, manifest.to_json().encode("utf-8"), durable=True)
    return manifest
