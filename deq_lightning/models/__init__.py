"""The model families, one file each, and the contract every task relies on.

Files: ``mdeq.py`` (MDEQ classifier and segmenter), ``deq_transformer.py`` and
``deq_trellisnet.py`` (language models; shared pieces in ``lm_layers.py``), ``deq_flow.py`` and
``raft.py`` (optical flow; shared front end in ``flow_layers.py``), ``baselines.py`` (timm nets),
``contract.py`` (:class:`~deq_lightning.models.contract.ModelOutput`).

The contract, so a task never inspects what it got:

* ``forward`` returns ``ModelOutput(output, stats)``: ``output`` is the family's prediction
  (logits, an ``LMOutput``, a dict of flows) and ``stats`` the DEQ's ``DEQStats``, ``None`` for a
  layered twin or a baseline. Tasks unpack it as ``output, stats = model(...)``.
* A DEQ model's constructor takes ``deq: dict | None`` (the :class:`~deq_lightning.deq.DEQ`
  kwargs) and builds ``self.deq = DEQ(**(deq or {}))``. The task builds ``deq`` from
  ``conf/solver`` and ``conf/backward``; it passes it only to classes whose signature names
  ``deq``, so the parameter must be named explicitly, not swallowed by ``**kwargs``.
* The module that holds the ``deq`` (the model or a submodule, as ``MDEQBackbone``) names the
  weight-tied module f applies in its class attribute ``equilibrium_cell``
  (``task.compile=true`` compiles just that module).
* The *layered twin* is the same family without the DEQ: ``depth = L > 0`` (a constructor
  argument, or a sibling class such as ``LayeredTransformerLM`` and ``RAFTFlow``) applies L layers
  trained by plain backprop and returns ``stats=None``. It reuses the DEQ's code (layer, stem,
  heads), so the two differ only in how the layer is used.
* Submodule and parameter names are checkpoint keys: renaming one breaks loading existing runs.

Adding a model:

1. Write ``models/<family>.py`` (one family per file; pieces two families share go into a small
   shared module, as ``lm_layers.py`` and ``flow_layers.py`` do) that follows the contract.
2. Add ``conf/model/<name>.yaml`` with ``_target_: deq_lightning.models.<family>.<Class>`` and
   the constructor's arguments (no ``deq``: the task adds it), plus a tiny config for tests and
   CPU runs (``<name>_tiny.yaml``) and, for a DEQ, its twin (``<name>_tiny_layered.yaml``).
3. Add the tiny configs to ``CASES`` in ``tests/models/test_contract.py`` (a test fails until a
   new ``_target_`` is listed there), and a ``tests/models/test_<family>.py`` for the family's
   own behaviour: shapes, gradients, that the DEQ's equilibrium is a fixed point.
"""
