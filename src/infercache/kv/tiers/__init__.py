"""Storage tiers of the KV engine (hot pool, disk, Redis) behind one small interface (base.Tier)."""
