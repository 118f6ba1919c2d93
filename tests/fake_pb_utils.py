"""A small in-process fake of Triton's ``triton_python_backend_utils`` (``pb_utils``).

It lets unit tests import and drive python-backend ``model.py`` files without a server: build
requests from numpy arrays, call ``execute``, and inspect what each request's response sender got.
Names and signatures follow python_backend (Triton 2.51): ``Tensor``, ``InferenceRequest``,
``InferenceResponse``, ``InferenceResponseSender``, ``TritonError`` (with its code constants),
``TritonModelException``, ``Logger``, ``MetricFamily``, the ``get_*_by_name`` / type helpers and the
flag constants. Test-only additions are marked "fake only".

Where the fake is stricter or simpler than the real thing:
- ``send`` after the final flag, or ``send()`` without a response and without the final flag, raise
  ``TritonModelException`` as in the real stub.
- BLS (``InferenceRequest.exec``/``async_exec``) runs handlers registered with ``register_bls``; the real
  decoupled iterator silently drops inner error responses, this one yields them.
- Tensors keep the numpy array as given (no copy to shared memory); ``str`` items in BYTES tensors
  are not converted to bytes.

Use::

    from fake_pb_utils import installed, load_model_module, make_request, make_initialize_args

    with installed() as pb_utils:                         # or: pb_utils = install(monkeypatch)
        mod = load_model_module(repo / "echo" / "1" / "model.py")
        model = mod.TritonPythonModel()
        model.initialize(make_initialize_args(config_text))
        req = make_request({"TEXT": np.array([b"a b"], dtype=object)})
        model.execute([req])
        req.response_sender.wait_final(5)
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import struct
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

MODULE_NAME = "triton_python_backend_utils"
_log = logging.getLogger("fake_pb_utils")

# Flag values as in tritonserver.h.
TRITONSERVER_REQUEST_FLAG_SEQUENCE_START = 1
TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 2
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


class TritonModelException(Exception):
    """Raised by pb_utils calls that fail (the real one is registered by the stub's C++ module)."""


class TritonError:
    """A per-response error; ``code`` is a TRITONSERVER_Error_Code value."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        if message is None or code is None:
            raise TypeError("TritonError(message, code): neither may be None")
        if not 0 <= int(code) <= 7:
            raise TypeError(f"TritonError: unknown error code {code!r}")
        self._message = str(message)
        self._code = int(code)

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, code={self._code})"


# ------------------------------------------------------------------------------------------------
# Types and config helpers
# ------------------------------------------------------------------------------------------------

TRITON_STRING_TO_NUMPY: dict[str, Any] = {
    "TYPE_BOOL": bool,
    "TYPE_UINT8": np.uint8,
    "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}

# TRITONSERVER_DataType enum values (1..13) in the order of the table above.
_TRITON_TYPE_CODES: list[tuple[int, Any]] = [
    (1, np.bool_),
    (2, np.uint8),
    (3, np.uint16),
    (4, np.uint32),
    (5, np.uint64),
    (6, np.int8),
    (7, np.int16),
    (8, np.int32),
    (9, np.int64),
    (10, np.float16),
    (11, np.float32),
    (12, np.float64),
    (13, np.object_),
]


def triton_string_to_numpy(triton_type_string: str) -> Any:
    return TRITON_STRING_TO_NUMPY[triton_type_string]


def triton_to_numpy_type(data_type: int) -> Any:
    for code, dtype in _TRITON_TYPE_CODES:
        if code == data_type:
            return dtype
    return None


def numpy_to_triton_type(data_type: Any) -> int | None:
    if data_type == np.bytes_:
        return 13
    for code, dtype in _TRITON_TYPE_CODES:
        if np.dtype(dtype) == np.dtype(data_type):
            return code
    return None


def serialize_byte_tensor(input_tensor: np.ndarray) -> bytes | tuple[()] | None:
    """Length-prefixed (little-endian uint32) concatenation of the items, in C order."""
    if input_tensor.size == 0:
        return ()
    if input_tensor.dtype != np.object_ and input_tensor.dtype.type != np.bytes_:
        return None
    chunks = []
    for item in input_tensor.reshape(-1):
        b = item if isinstance(item, bytes) else str(item).encode("utf-8")
        chunks.append(struct.pack("<I", len(b)) + b)
    return b"".join(chunks)


def deserialize_bytes_tensor(encoded_tensor: bytes) -> np.ndarray:
    items = []
    offset = 0
    while offset < len(encoded_tensor):
        (n,) = struct.unpack_from("<I", encoded_tensor, offset)
        offset += 4
        items.append(bytes(encoded_tensor[offset : offset + n]))
        offset += n
    return np.array(items, dtype=np.object_)


def _find_named(items: Iterable[Any], name: str) -> Any:
    for item in items:
        if item.name() == name:
            return item
    return None


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    return _find_named(inference_request.inputs(), name)


def get_output_tensor_by_name(inference_response: InferenceResponse, name: str) -> Tensor | None:
    return _find_named(inference_response.output_tensors(), name)


def get_input_config_by_name(model_config: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    for entry in model_config.get("input", []):
        if entry["name"] == name:
            return entry
    return None


def get_output_config_by_name(model_config: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    for entry in model_config.get("output", []):
        if entry["name"] == name:
            return entry
    return None


def using_decoupled_model_transaction_policy(model_config: Mapping[str, Any]) -> bool:
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


# ------------------------------------------------------------------------------------------------
# Tensors, requests, responses
# ------------------------------------------------------------------------------------------------


class Tensor:
    """``Tensor(name, numpy_array)``; only CPU tensors."""

    def __init__(self, name: str, array: np.ndarray) -> None:
        if not isinstance(array, np.ndarray):
            raise TypeError(f"Tensor {name!r}: expected a numpy array, got {type(array).__name__}")
        if numpy_to_triton_type(array.dtype) is None and array.dtype.type != np.bytes_:
            raise TritonModelException(f"Tensor {name!r}: unsupported numpy dtype {array.dtype}")
        self._name = name
        self._array = array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def triton_dtype(self) -> int:
        code = numpy_to_triton_type(self._array.dtype)
        return 13 if code is None else code

    def is_cpu(self) -> bool:
        return True

    def to_dlpack(self) -> Any:
        return self._array.__dlpack__()

    @staticmethod
    def from_dlpack(name: str, capsule: Any) -> Tensor:
        return Tensor(name, np.from_dlpack(capsule))

    def __repr__(self) -> str:
        return f"Tensor({self._name!r}, shape={self._array.shape}, dtype={self._array.dtype})"


def _params_json(parameters: Mapping[str, Any] | None) -> str:
    params = dict(parameters or {})
    for key, value in params.items():
        if not isinstance(key, str):
            raise TritonModelException(f"parameter keys must be str, got {type(key).__name__}")
        if not isinstance(value, bool | int | str):
            raise TritonModelException(
                f"parameter {key!r}: values must be bool/int/str, got {type(value).__name__}"
            )
    return json.dumps(params)


class InferenceResponse:
    def __init__(
        self,
        output_tensors: Sequence[Tensor] | None = None,
        error: TritonError | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> None:
        self._outputs = list(output_tensors or [])
        self._error = error
        self._parameters = _params_json(parameters)

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def parameters(self) -> str:
        return self._parameters

    # fake only: the output as numpy, or None
    def output(self, name: str) -> np.ndarray | None:
        t = get_output_tensor_by_name(self, name)
        return None if t is None else t.as_numpy()


class InferenceResponseSender:
    """Records what a decoupled model sends. ``sent`` holds (response or None, flags) in order."""

    def __init__(self, request: InferenceRequest | None = None) -> None:
        self._request = request
        self._cond = threading.Condition()
        self.sent: list[tuple[InferenceResponse | None, int]] = []
        self._final = False

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        with self._cond:
            if self._final:
                raise TritonModelException("Unable to send response. Response sender has been closed.")
            if flags not in (0, TRITONSERVER_RESPONSE_COMPLETE_FINAL):
                raise TritonModelException(f"invalid response flags {flags}")
            if response is None and flags != TRITONSERVER_RESPONSE_COMPLETE_FINAL:
                raise TritonModelException(
                    "Inference Response object must be provided when the response flags is not equal to "
                    "TRITONSERVER_RESPONSE_COMPLETE_FINAL."
                )
            if response is not None and not isinstance(response, InferenceResponse):
                raise TypeError(f"send() expects an InferenceResponse, got {type(response).__name__}")
            self.sent.append((response, flags))
            if flags == TRITONSERVER_RESPONSE_COMPLETE_FINAL:
                self._final = True
            self._cond.notify_all()

    def is_cancelled(self) -> bool:
        return self._request is not None and self._request.is_cancelled()

    # -- fake only --------------------------------------------------------------------------------

    @property
    def final(self) -> bool:
        with self._cond:
            return self._final

    @property
    def responses(self) -> list[InferenceResponse]:
        """The responses sent (a bare final flag adds none)."""
        with self._cond:
            return [r for r, _ in self.sent if r is not None]

    @property
    def errors(self) -> list[TritonError]:
        return [e for r in self.responses if (e := r.error()) is not None]

    def wait_final(self, timeout: float = 10.0) -> list[InferenceResponse]:
        """Block until the final flag was sent; returns the responses. Raises TimeoutError."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._final, timeout=timeout):
                raise TimeoutError(f"no final flag within {timeout} s; sent so far: {len(self.sent)}")
        return self.responses

    def outputs(self, name: str) -> list[np.ndarray]:
        """The numpy value of output ``name`` of each response that has it."""
        return [a for r in self.responses if (a := r.output(name)) is not None]


# BLS handlers, by model name (fake only): fn(request) -> iterable of responses.
BlsHandler = Callable[["InferenceRequest"], Iterable[InferenceResponse]]
_bls_handlers: dict[str, BlsHandler] = {}


def register_bls(model_name: str, handler: BlsHandler) -> None:
    """fake only: make ``InferenceRequest(model_name=...).exec()`` answer with ``handler(request)``."""
    _bls_handlers[model_name] = handler


def clear_bls() -> None:
    """fake only."""
    _bls_handlers.clear()


class InferenceRequest:
    def __init__(
        self,
        request_id: str = "",
        correlation_id: int | str = 0,
        inputs: Sequence[Tensor] | None = None,
        requested_output_names: Sequence[str] | None = None,
        model_name: str = "",
        model_version: int = -1,
        flags: int = 0,
        timeout: int = 0,
        preferred_memory: Any = None,
        trace: Any = None,
        parameters: Mapping[str, Any] | str | None = None,
    ) -> None:
        if inputs is None or requested_output_names is None:
            raise TypeError("InferenceRequest needs inputs= and requested_output_names=")
        if not isinstance(correlation_id, int | str):
            raise TritonModelException("Correlation ID must be integer or string")
        self._request_id = request_id
        self._correlation_id = correlation_id
        self._inputs = list(inputs)
        self._requested = list(requested_output_names)
        self.model_name = model_name
        self.model_version = model_version
        self._flags = flags
        self._timeout = timeout
        self._parameters = parameters if isinstance(parameters, str) else _params_json(parameters)
        self._cancelled = threading.Event()
        self._sender: InferenceResponseSender | None = None
        self.release_flags: int | None = None

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def request_id(self) -> str:
        return self._request_id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def flags(self) -> int:
        return self._flags

    def set_flags(self, flags: int) -> None:
        self._flags = flags

    def timeout(self) -> int:
        return self._timeout

    def parameters(self) -> str:
        return self._parameters

    def requested_output_names(self) -> list[str]:
        return self._requested

    def get_response_sender(self) -> InferenceResponseSender:
        if self._sender is None:
            self._sender = InferenceResponseSender(self)
        return self._sender

    def is_cancelled(self) -> bool:
        return self._cancelled.is_set()

    def set_release_flags(self, flags: int) -> None:
        self.release_flags = flags

    def exec(self, decoupled: bool = False) -> Any:
        handler = _bls_handlers.get(self.model_name)
        if handler is None:
            raise TritonModelException(
                f"Failed for execute the inference request. Model '{self.model_name}' is not ready."
            )
        responses = list(handler(self))
        if decoupled:
            return iter(responses)
        if len(responses) != 1:
            raise TritonModelException(
                f"BLS to {self.model_name!r}: expected one response, got {len(responses)}"
            )
        return responses[0]

    async def async_exec(self, decoupled: bool = False) -> Any:
        await asyncio.sleep(0)
        return self.exec(decoupled=decoupled)

    # -- fake only --------------------------------------------------------------------------------

    @property
    def response_sender(self) -> InferenceResponseSender:
        return self.get_response_sender()

    def cancel(self) -> None:
        """Simulate the client cancelling the request."""
        self._cancelled.set()


# ------------------------------------------------------------------------------------------------
# Logger and metrics
# ------------------------------------------------------------------------------------------------


class Logger:
    INFO = 0
    WARNING = 1
    ERROR = 2
    VERBOSE = 3
    records: list[tuple[int, str]] = []  # fake only

    @staticmethod
    def log(message: str, level: int = 0) -> None:
        Logger.records.append((level, message))
        _log.log({0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR}.get(level, logging.DEBUG), message)

    @staticmethod
    def log_info(message: str) -> None:
        Logger.log(message, Logger.INFO)

    @staticmethod
    def log_warn(message: str) -> None:
        Logger.log(message, Logger.WARNING)

    @staticmethod
    def log_error(message: str) -> None:
        Logger.log(message, Logger.ERROR)

    @staticmethod
    def log_verbose(message: str) -> None:
        Logger.log(message, Logger.VERBOSE)


class Metric:
    def __init__(self, kind: int, labels: Mapping[str, str] | None) -> None:
        self.kind = kind
        self.labels = dict(labels or {})
        self._value = 0.0
        self.observations: list[float] = []

    def increment(self, value: float) -> None:
        if self.kind != MetricFamily.COUNTER and self.kind != MetricFamily.GAUGE:
            raise TritonModelException("increment is for counters and gauges")
        if self.kind == MetricFamily.COUNTER and value < 0:
            raise TritonModelException("a counter cannot decrease")
        self._value += value

    def set(self, value: float) -> None:
        if self.kind != MetricFamily.GAUGE:
            raise TritonModelException("set is for gauges")
        self._value = value

    def observe(self, value: float) -> None:
        if self.kind != MetricFamily.HISTOGRAM:
            raise TritonModelException("observe is for histograms")
        self.observations.append(value)

    def value(self) -> float:
        return self._value


class MetricFamily:
    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2

    def __init__(self, name: str, description: str, kind: int) -> None:
        self.name = name
        self.description = description
        self.kind = kind
        self.metrics: list[Metric] = []

    def Metric(
        self, labels: Mapping[str, str] | None = None, buckets: Sequence[float] | None = None
    ) -> Metric:
        m = Metric(self.kind, labels)
        self.metrics.append(m)
        return m


# ------------------------------------------------------------------------------------------------
# Test helpers (fake only)
# ------------------------------------------------------------------------------------------------


def make_request(
    inputs: Mapping[str, np.ndarray],
    requested_output_names: Sequence[str] = (),
    request_id: str = "",
    parameters: Mapping[str, Any] | None = None,
    model_name: str = "",
) -> InferenceRequest:
    """A request as the server would hand it to ``execute`` (None values are left out: omitted optionals)."""
    tensors = [Tensor(k, v) for k, v in inputs.items() if v is not None]
    return InferenceRequest(
        request_id=request_id or uuid.uuid4().hex[:8],
        inputs=tensors,
        requested_output_names=list(requested_output_names),
        model_name=model_name,
        parameters=parameters,
    )


def _int64_as_numbers(descriptor: Any, data: dict[str, Any]) -> None:
    """Undo protobuf's JSON mapping of 64-bit integers to strings, in place (Triton does the same)."""
    from google.protobuf.descriptor import FieldDescriptor

    wide = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)
    for fd in descriptor.fields:
        if fd.name not in data:
            continue
        value = data[fd.name]
        repeated = getattr(fd, "is_repeated", None)
        if repeated is None:
            repeated = fd.label == FieldDescriptor.LABEL_REPEATED
        if fd.cpp_type in wide:
            data[fd.name] = [int(v) for v in value] if repeated else int(value)
        elif fd.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            if fd.message_type.GetOptions().map_entry:
                value_fd = fd.message_type.fields_by_name["value"]
                for key in list(value):
                    if value_fd.cpp_type in wide:
                        value[key] = int(value[key])
                    elif value_fd.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
                        _int64_as_numbers(value_fd.message_type, value[key])
            elif repeated:
                for item in value:
                    _int64_as_numbers(fd.message_type, item)
            else:
                _int64_as_numbers(fd.message_type, value)


def model_config_from_pbtxt(text: str) -> dict[str, Any]:
    """Parse config.pbtxt into the dict Triton gives the model (``json.loads(args["model_config"])``).

    Uses the ModelConfig proto shipped in tritonclient, field names as in the proto, fields without
    presence printed, 64-bit integers such as ``dims`` as numbers, enums as names (``"TYPE_STRING"``),
    parameters as ``{"KEY": {"string_value": ...}}`` - as the server does. It does not add what the
    server fills in on load (instance group names, optimization defaults, ...).
    """
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    msg = text_format.Parse(text, model_config_pb2.ModelConfig())
    data = json_format.MessageToDict(
        msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _int64_as_numbers(msg.DESCRIPTOR, data)
    return data


def make_initialize_args(
    model_config: Mapping[str, Any] | str,
    *,
    model_name: str | None = None,
    model_version: str = "1",
    model_repository: str = "",
    instance_kind: str = "CPU",
    device_id: str = "0",
) -> dict[str, str]:
    """The ``args`` dict ``initialize`` gets. ``model_config``: a dict, or config.pbtxt text.

    As on the server, all values are strings and ``model_repository`` is the model's own directory
    (``<repository>/<model name>``), not the repository root.
    """
    config = model_config_from_pbtxt(model_config) if isinstance(model_config, str) else dict(model_config)
    name = model_name or config.get("name") or "model"
    return {
        "model_config": json.dumps(config),
        "model_instance_kind": instance_kind,
        "model_instance_name": f"{name}_0_0",
        "model_instance_device_id": device_id,
        "model_repository": model_repository,
        "model_version": model_version,
        "model_name": name,
    }


def load_model_module(path: Path | str, module_name: str | None = None) -> ModuleType:
    """Import a model.py file by path (call while the fake is installed, since it imports pb_utils)."""
    path = Path(path)
    name = module_name or f"_pb_model_{path.parent.parent.name}_{uuid.uuid4().hex[:6]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _this_module() -> ModuleType:
    return sys.modules[__name__]


@contextlib.contextmanager
def installed() -> Iterator[ModuleType]:
    """Make ``import triton_python_backend_utils`` give this fake inside the block; restore afterwards."""
    had_previous = MODULE_NAME in sys.modules
    previous = sys.modules.get(MODULE_NAME)
    sys.modules[MODULE_NAME] = _this_module()
    clear_bls()
    Logger.records.clear()
    try:
        yield _this_module()
    finally:
        clear_bls()
        if had_previous and previous is not None:
            sys.modules[MODULE_NAME] = previous
        else:
            sys.modules.pop(MODULE_NAME, None)


def install(monkeypatch: Any) -> ModuleType:
    """pytest flavour: ``pb_utils = install(monkeypatch)``; undone when the test ends."""
    module = _this_module()
    # Fresh BLS handlers and log records for this test; monkeypatch restores the previous ones.
    monkeypatch.setattr(module, "_bls_handlers", {})
    monkeypatch.setattr(Logger, "records", [])
    monkeypatch.setitem(sys.modules, MODULE_NAME, module)
    return module
