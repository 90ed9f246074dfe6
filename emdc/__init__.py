"""The ``emdc`` command: its root group (:mod:`emdc.cli`) and the one composition of both sides
(:mod:`emdc.simulate`). The edge and the backend each own their commands."""
