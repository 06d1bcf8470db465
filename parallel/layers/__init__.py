"""Model building blocks: tensor-parallel linears with weight loaders, paged attention, rotary, norm."""
