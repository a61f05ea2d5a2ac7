"""A call's runtime: the sans-I/O call machine (:mod:`.machine`) and the driver that gives it sockets,
timers and tasks (:mod:`.driver`)."""
