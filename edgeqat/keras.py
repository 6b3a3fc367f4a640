"""The one place that chooses Keras 2 (tf_keras) and imports TensorFlow.

tensorflow-model-optimization works only with Keras 2, so ``TF_USE_LEGACY_KERAS`` must be
set before TensorFlow is first imported. Every other module imports ``tf``, ``keras`` and
``tfmot`` from here.
"""

import contextlib
import os
import re
import sys
import tempfile

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# TensorFlow's C++ start-up lines (no CUDA driver, CPU features, absl pre-init notice)
# ignore TF_CPP_MIN_LOG_LEVEL. They are caught during the import and dropped; any other
# line written to stderr meanwhile is passed on.
_NOISE = re.compile(r"cudart_stub|cuda_platform|cuda_dnn|cuda_fft|cuda_blas|cpu_feature_guard|"
                    r"absl::InitializeLog|rebuild TensorFlow with the appropriate|"
                    r"computation placer|oneDNN custom operations")


@contextlib.contextmanager
def quiet_stderr(noise: re.Pattern = _NOISE):
    """Drops lines matching ``noise`` that C++ code writes to fd 2 inside the block.

    Every other line is passed on when the block ends (also when it raises), so errors
    are never hidden, only held until then.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real fd 2 (embedded interpreters, some notebooks)
        saved = None
    with tempfile.TemporaryFile(mode="w+b") as caught:
        if saved is not None:
            os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            if saved is not None:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                caught.seek(0)
                for line in caught.read().decode(errors="replace").splitlines(keepends=True):
                    if not noise.search(line):
                        sys.stderr.write(line)


def _import_quietly():
    with quiet_stderr():
        import tensorflow
        import tensorflow_model_optimization
        import tf_keras
    return tensorflow, tensorflow_model_optimization, tf_keras


tf, tfmot, keras = _import_quietly()

tf.get_logger().setLevel("ERROR")  # TensorFlow's own INFO lines drown edgeqat's stage log

__all__ = ["tf", "keras", "tfmot", "require_keras2", "quiet_stderr"]


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
            "needs Keras 2: build it with `import tf_keras as keras`, or save it with "
            "model.save('model.keras') and give that file as model.path (edgeqat rebuilds "
            "Keras 3 files as tf_keras)"
        )
    raise TypeError(f"{what} is a {type(model).__name__}, not a tf_keras Model")
