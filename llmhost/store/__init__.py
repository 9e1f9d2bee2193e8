"""SQL persistence shared by replicas: stored responses (responses).

May import: config. Never api/."""
