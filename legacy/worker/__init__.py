"""``worker``, the import name of llm_pool_worker before 0.2: it is that package, with a DeprecationWarning, until 0.3."""

from llm_pool_contracts.old_names import stand_in

stand_in(__name__)
