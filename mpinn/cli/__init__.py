"""cli: the command line: the commands as tables, the options of train derived from the
configuration, the parser that speaks once under mpiexec, and main (dispatch and exit
codes)."""
