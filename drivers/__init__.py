"""Adapters to the outside: CAN buses, the simulated pack, SLCAN over TCP."""
