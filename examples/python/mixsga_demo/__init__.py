"""The demo and the quality study: applications of mixsga, not part of the installed library.

``corpus`` reads Debian's text packages (machine paths), ``demo`` runs `make demo`, ``study`` runs
`make study`. Importing this package sets no process-wide state; the scripts that run it do.
"""
