"""Publishing output folders: the only way pera-deploy writes a folder.

* `publication`: `publish()`: temporary folder → write and check → manifest → card → atomic rename;
* `output_folder`: the temporary folder beside the target, and what may be replaced;
* `manifest`: the manifest schema (versioned) and the records of inputs;
* `model_card`: the one README.md writer.
"""

from .publication import Written, adapter_inputs, publish

__all__ = ["Written", "adapter_inputs", "publish"]
