"""The one place that chooses Keras 2 (tf_keras) and imports TensorFlow.

tensorflow-model-optimization works only with Keras 2, so ``TF_USE_LEGACY_KERAS`` must be
set before TensorFlow is first imported. Every other module imports ``tf``, ``keras`` and
``tfmot`` from here.
"""

import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402

tf.get_logger().setLevel("ERROR")  # TensorFlow's own INFO lines drown edgeqat's stage log

__all__ = ["tf", "keras", "tfmot", "require_keras2"]


def require_keras2(model, what: str = "model") -> None:
    """Raises a clear error when ``model`` is a Keras 3 object rather than tf_keras.

    Args:
      model: the object a user handed in.
      what: how to name it in the message.

    Raises:
      TypeError: ``model`` is not a tf_keras model.
    """
    if isinstance(model, keras.Model):
        return
    module = type(model).__module__
    if module.startswith("keras"):
        raise TypeError(
            f"{what} is a Keras 3 object ({type(model).__name__} from {module}); edgeqat "
            "needs Keras 2: build it with `import tf_keras as keras`, or save it to .h5 "
            "/ SavedModel and load it with edgeqat.models.load_model"
        )
    raise TypeError(f"{what} is a {type(model).__name__}, not a tf_keras Model")
