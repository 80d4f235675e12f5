"""Distillation methods, one module per method: ``<name>.py`` defines ``METHOD = Method(...)``.

A student's ``method: <name>`` resolves to ``replication.methods.<name>`` by name
(``replication.common.methods.method_record``), so adding a method is adding one module here, and no
student's code fingerprint includes another method's module.
"""
