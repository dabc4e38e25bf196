"""RQ4, which heads carry the target in each model: grad x activation per head (:mod:`~mechdiff.rq4.attribution`, the
``attribution`` stage) and head churn between the models with its noise floor (:mod:`~mechdiff.rq4.churn`, the
``churn`` stage).
"""
