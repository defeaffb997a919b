"""Built on the core: evaluation protocols (GG, GNs, GNu), the continual-learning harness, Scenario NNs
(allocation), Hopfield mask memory (HopSupSup), SplitCIFAR100 GG, and the reproducible experiment CLI."""
