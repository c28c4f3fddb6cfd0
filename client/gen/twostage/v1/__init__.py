"""Generated from protos/twostage/v1 by scripts/gen_protos.py. Do not edit."""
