"""cmcd's processes: one process running the whole path of a message (process.py), or a supervisor
(supervisor.py) and [server] workers such processes, each on its own spool shard; the `cmcd`
command (cli.py). The top layer: wires the others together, holds no rules.
"""
