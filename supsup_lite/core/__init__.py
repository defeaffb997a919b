"""The one idea: a frozen random base network plus a bank of binary masks, one per task.

bits (1-bit packing) → masks (scores, straight-through rules, ``MaskBank``) → models (base networks, the masked
forward) → superpose (W ⊙ Σ_t α_t M_t over the packed bank) → inference (H, G, One-Shot, binary search) →
training (learning masks). ``storage`` counts the bytes of the formats a mask can be kept in.
"""
