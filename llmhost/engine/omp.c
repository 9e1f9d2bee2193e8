/* An OpenMP team's threads on CPUs of their own while a model thread is busy (engine/omp.py
 * says why).
 *
 * A thread that libgomp creates for a new pool (omp.release() hands a model thread's pool back
 * whenever it idles), or wakes after it slept, often starts on the CPU of the thread that made
 * or woke it: both then spin on one core, taking turns a scheduler slice at a time, until the
 * kernel's balancer moves one, 4-10 ms later (a 2-core EPYC: the first two parallel regions of a
 * fresh pool took ~6 and ~4 ms where the others took 25 us, in 5 of 6 tries). Moving such a
 * thread away for a moment did not last: the next region found the two together again in 3 of 8
 * tries. So omp_spread pins each thread of the team to a CPU no other thread of the team is on
 * (the master keeps its own; a thread stays where it is when no CPU is free), and omp_unpin,
 * when the model thread goes idle, gives the master its own CPU mask back (the workers end with
 * the pool, omp.release()). */
#define _GNU_SOURCE
#include <omp.h>
#include <sched.h>

#define MAX_TEAM 256

static __thread int pinned = -1;    /* the CPU this thread is pinned to, or -1 */
static __thread cpu_set_t before;   /* its mask before that */

/* thread's pin: pinned to `cpu` (its mask saved the first time) */
static void pin(int cpu) {
    cpu_set_t one;
    if (pinned == cpu)
        return;
    if (pinned < 0 && sched_getaffinity(0, sizeof before, &before))
        return;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    if (!sched_setaffinity(0, sizeof one, &one))
        pinned = cpu;
}

/* Run a parallel region of `nt` threads (at most MAX_TEAM) and pin each to a CPU of its own
   where one is free: the master where it is, the others where they are unless a thread of
   lower number is there, then on the first CPU of the master's original mask that no thread of
   the team is on. Until the threads are pinned they wait for each other by sched_yield, not
   libgomp's spinning barrier: two of them on one CPU then take turns at once instead of a
   scheduler slice apart. cpus[t] (t < nt) gets thread t's CPU after it (-1 for a thread the
   region did not get). Returns how many threads moved. */
int omp_spread(int nt, int *cpus) {
    int at[MAX_TEAM], arrived = 0, moved = 0;   /* shared by the region */
    cpu_set_t allowed;
    if (nt < 1 || nt > MAX_TEAM)
        return 0;
    if (pinned >= 0) allowed = before;
    else if (sched_getaffinity(0, sizeof allowed, &allowed)) return 0;
    for (int t = 0; cpus && t < nt; t++) cpus[t] = -1;
    #pragma omp parallel num_threads(nt) reduction(+:moved)
    {
        int t = omp_get_thread_num(), n = omp_get_num_threads(), target = -1;
        at[t] = sched_getcpu();
        __atomic_add_fetch(&arrived, 1, __ATOMIC_RELEASE);
        while (__atomic_load_n(&arrived, __ATOMIC_ACQUIRE) < n)
            sched_yield();
        /* every thread works out the same targets (threads before t first) and takes its own */
        cpu_set_t used;
        CPU_ZERO(&used);
        for (int j = 0; j <= t; j++) {
            int here = at[j] >= 0 && at[j] < CPU_SETSIZE && CPU_ISSET(at[j], &allowed) ? at[j] : -1;
            target = here >= 0 && !CPU_ISSET(here, &used) ? here : -1;
            for (int c = 0; target < 0 && c < CPU_SETSIZE; c++) {
                int taken = CPU_ISSET(c, &used);
                for (int i = j + 1; i < n && !taken; i++) taken = at[i] == c;
                if (CPU_ISSET(c, &allowed) && !taken) target = c;
            }
            if (target >= 0) CPU_SET(target, &used);
        }
        if (target >= 0) {
            moved += target != at[t];
            pin(target);
        }
        #pragma omp barrier
        if (cpus) cpus[t] = sched_getcpu();
    }
    return moved;
}

/* The calling thread's mask as it was before omp_spread pinned it (nothing if it did not). */
void omp_unpin(void) {
    if (pinned >= 0) {
        sched_setaffinity(0, sizeof before, &before);
        pinned = -1;
    }
}
