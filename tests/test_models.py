import pytest

from edgeqat.config import ModelConfig
from edgeqat.errors import UserError
from edgeqat.keras import keras
from edgeqat.models import build_model, load_model


def test_dscnn_has_bn_relu6_and_depthwise():
    m = build_model(ModelConfig(builder="dscnn"), (8, 8, 1), 10)
    kinds = {type(layer).__name__ for layer in m.layers}
    assert {"Conv2D", "DepthwiseConv2D", "BatchNormalization", "ReLU"} <= kinds
    assert m.output_shape == (None, 10)


def test_mnist1d_cnn_is_conv1d():
    m = build_model(ModelConfig(builder="mnist1d_cnn"), (40, 1), 10)
    convs = [layer for layer in m.layers if isinstance(layer, keras.layers.Conv1D)]
    # The paper's layers: kernels 5, 3, 3, stride 2, ReLU, flatten, one linear layer.
    assert [(c.kernel_size[0], c.strides[0]) for c in convs] == [(5, 2), (3, 2), (3, 2)]
    assert [type(layer).__name__ for layer in m.layers[-2:]] == ["Flatten", "Dense"]
    assert m.layers[-1].input_shape == (None, 5 * convs[0].filters)  # lengths 20, 10, 5


def test_module_function_builder():
    m = build_model(ModelConfig(builder="edgeqat.models:mlp"), (4,), 3)
    assert m.output_shape == (None, 3)


@pytest.mark.parametrize("builder, message", [
    ("resnet9000", "model.builder = 'resnet9000' is unknown"),
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz"),
    ("edgeqat.models:nothing", "edgeqat.models has no function nothing"),
])
def test_bad_builder(builder, message):
    with pytest.raises(UserError, match=message):
        build_model(ModelConfig(builder=builder), (4,), 3)


def test_saved_model_loads(tmp_path):
    m = build_model(ModelConfig(builder="mlp"), (4,), 3)
    m.save(tmp_path / "m.keras")
    assert load_model(tmp_path / "m.keras").count_params() == m.count_params()


def test_not_a_keras_file(tmp_path):
    bad = tmp_path / "model.h5"
    bad.write_text("not a model")
    with pytest.raises(UserError, match="model.h5: not a loadable Keras model"):
        load_model(bad)
