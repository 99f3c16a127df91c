"""infercache: the caches that LLM inference depends on.

Sub-packages: ``kernels`` (compiled-kernel caches), ``vault`` (cache images),
``kv`` (KV-cache pools and engine), ``gpu`` (targets and detection).
Nothing heavy is imported here: importing the package does no work.
"""

__version__ = "0.1.0"
