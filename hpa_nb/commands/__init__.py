"""The command line's verbs, one module each (`hpa_nb.cli.VERBS` names them): each handler is a thin layer over
the library, imported only when its verb runs, so `--help` and the light verbs never load TensorFlow.

Above every stage, like `hpa_nb.cli`: may import any stage, never `hpa_nb.cli`.
"""
