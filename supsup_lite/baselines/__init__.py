"""The paper's baselines: regularisers (EWC, SI), per-task contexts (BatchE, PSP), and their harness adapters."""
