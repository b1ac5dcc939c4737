"""Load-balancer drivers: the controller talks to one through `base.LoadBalancerDriver`."""
