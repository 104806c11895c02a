"""The PERA math and the canonical in-memory adapter. Pure: nothing here touches a file.

* `pera`: pair order, expanded factors, ΔW, exact (zero-term-free) factors;
* `lowrank`: one factored norm, and best low-rank approximations of a factored update;
* `adapter`: `PeraLayer` / `PeraAdapter`, what every loader produces;
* `names`: matching dotted names across differently prefixed models.
"""
