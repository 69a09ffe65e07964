"""The built-in toy world: procedural images of shapes in fictional artists' styles, a teacher and a judge
trained on it, so that concept leakage and erasure can be seen and measured on a CPU in minutes."""
from . import plugins  # noqa: F401 - registers the toy judge and prompt set with evaluation's registries
