"""Many devices: the mesh and the one mapping of logical to mesh axes (`sharding`), start-up before and of
jax (`devices`, `distributed`), memory against what a device has (`memory`) and the collectives of a compiled
step (`hlo_collectives`)."""
