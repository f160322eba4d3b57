"""Small, self-contained LightningModules for tests, examples and benchmarks (like Lightning's BoringModel)."""

from lightning_hrp.demos.factorisation import FactorisationToy, factorisation_target

__all__ = ["FactorisationToy", "factorisation_target"]
