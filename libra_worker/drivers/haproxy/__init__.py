"""The HAProxy driver: render, check, apply and supervise an HAProxy in master-worker mode."""
