"""Label, annotation and finalizer names that more than one role relies on."""

#: On every Replica: the name of the Job it belongs to (set by the job controller).
JOB_LABEL = "skyshift.dev/job"
#: On every Namespace: the namespace controller empties it before it goes.
NAMESPACE_FINALIZER = "skyshift.dev/namespace"
#: On started Replicas: their skylet stops the processes before the object goes.
SKYLET_FINALIZER = "skyshift.dev/skylet"
