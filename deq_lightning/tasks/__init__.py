"""Lightning tasks: each turns a batch into a loss and metrics around one model family.

How to add a task: subclass :class:`~deq_lightning.tasks.base.DEQTask` and implement
``step(batch, stage) -> loss``. Call ``self.run_model(...)`` (never ``self.model``): it applies
the DEQ schedule (pre-training, Jacobian steps, jitter) and returns the model's
:class:`~deq_lightning.models.contract.ModelOutput`; add ``self.add_deq_losses(loss, stats)`` in
training and log with ``self.log_deq(stats, stage, batch_size)``. The task's own options are
``__init__`` arguments; pass the rest (``**kwargs``) on to ``super().__init__``. Then add
``conf/task/<name>.yaml`` (``defaults: [base, _self_]``, ``_target_`` the class, its options)
and an experiment that picks it.
"""
