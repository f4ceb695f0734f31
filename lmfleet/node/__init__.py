"""Everything about one node: what it is (`state`), what it reports (`load`), how its
answers judge it (`outliers`), how users see it (`views`), which routes its engine
serves (`profile`), the one client that talks to it (`client`), and the commands
that put it to sleep, wake it and drain it (`admin`)."""
