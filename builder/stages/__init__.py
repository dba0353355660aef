"""The build as stages: each a function from typed inputs to a typed, JSON-serialisable record, cached by the
hash of its inputs.

The stage contract (every stage, today's and future ones such as vocabulary trimming, LoRA adaptation,
distillation or a GGUF input, has this shape)::

    class XInputs(StageInputs):        # frozen pydantic model
        source: Input                  # a file/folder read: path + sha256 (only the digest is in the key)
        option: int                    # config fields that change the result, and nothing else
    class XRecord(StageRecord):        # pydantic model: paths, sha256, counts, figures (JSON, NaN allowed)
        result: SomeResultDataclass
    def run_x(inputs: XInputs, out_dir: Path) -> XRecord:
        ...                            # write artefacts only inside out_dir (an empty folder); raise a
                                       # fieldpack.shared.errors BuildError subclass on bad input
    X = Stage("x", "1", XRecord, run_x, libraries=("torch",), code=("fieldpack.builder.x",))

- **Key**: sha256 of the stage name and version, fieldpack's version, the versions of ``libraries``, the
  source of the ``code`` modules, and :meth:`StageInputs.key_material` (plain fields as JSON, each
  :class:`Input` by its sha256). Bump ``version`` when the output changes for the same inputs.
- **Cache** (:mod:`.cache`): ``<cache>/<stage>/<key>/`` holds ``record.json``, ``files.json`` (size and
  sha256 of every artefact) and ``out/``. Entries are written to a temp folder and renamed into place; before
  reuse every artefact is re-hashed, and a missing or altered file makes the stage run again. The default
  cache is ``~/.cache/fieldpack/build`` (``$FIELDPACK_BUILD_CACHE``, ``fieldpack build --cache-dir``);
  ``--no-cache`` runs every stage inside the build's scratch folder.
- **Chaining**: a downstream stage takes an upstream artefact as ``record.artefact(name).as_input()`` or
  ``record.input_for(path)`` (no re-hashing), so its key changes exactly when what it reads changes.
- **Running**: ``runner(STAGE, inputs)`` (:class:`~.cache.Runner`) returns the record, with
  ``record.cached`` True when reused; progress hooks get ``"start"``/``"done"`` or ``"cached"``. Any stage can
  be run on its own: ``STAGE.fn(inputs, out_dir)`` without a cache, or through a Runner with one.
- **Graph**: :mod:`.orchestrator` wires the stages for ``fieldpack build``; :mod:`fieldpack.builder.manifest_build`
  assembles the manifest from the records. A new stage is a module here plus one call in the orchestrator;
  one whose record has the shape of an existing one (the GGUF input's :class:`~.gguf.GgufInputRecord` is a
  :class:`~.model.ConvertRecord`) replaces it without touching the stages after it.

Modules: :mod:`.base` (Input, StageInputs, StageRecord, Stage), :mod:`.cache` (StageCache, Runner),
:mod:`.embedder`, :mod:`.docs` (ingest, index, smoke question), :mod:`.model` (convert, parity),
:mod:`.gguf` (gguf input), :mod:`.quant` (eval split, compress, quantize, quality), :mod:`.trim` (vocabulary
trimming and its gate, ``--trim-vocab``), :mod:`.orchestrator`.
"""

from fieldpack.builder.stages.base import Artefact, Input, Stage, StageInputs, StageRecord
from fieldpack.builder.stages.cache import Runner, StageCache, StageTiming, default_cache_dir

__all__ = ["Artefact", "Input", "Runner", "Stage", "StageCache", "StageInputs", "StageRecord", "StageTiming",
           "default_cache_dir"]
