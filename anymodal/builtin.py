"""The built-in component types, registered in one place.

Importing this module imports every module that defines a built-in type; each type registers
itself with the registry's decorators where it is defined. ``anymodal/__init__.py`` imports this
module, so the built-in types are known once any part of the package is imported. The registry
itself imports none of them (it would form an import cycle with every component module);
third-party types arrive through the ``anymodal.components`` entry points
(:func:`anymodal.registry.load_plugins`).
"""

import anymodal.encoders.hf  # noqa: F401  clip, clap, hf-vision
import anymodal.encoders.imagebind  # noqa: F401  imagebind
import anymodal.generators.audio  # noqa: F401  audioldm, audioldm2
import anymodal.generators.image  # noqa: F401  stable-diffusion
import anymodal.generators.unclip  # noqa: F401  stable-unclip
import anymodal.generators.video  # noqa: F401  text-to-video, animatediff
import anymodal.projectors  # noqa: F401  input: linear, mlp, qformer; output: transformer
