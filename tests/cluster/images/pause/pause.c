/* The pod sandbox's one process: it holds the pod's namespaces open and does nothing else.
 * PID 1 of the sandbox, so it must reap orphans (SIGCHLD) and exit on SIGINT/SIGTERM. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig)
{
	(void)sig;
	_exit(0);
}

static void reap(int sig)
{
	(void)sig;
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
}

int main(void)
{
	struct sigaction term = {.sa_handler = stop}, child = {.sa_handler = reap};

	if (getpid() != 1)
		return 1; /* only meaningful as a sandbox's init */
	sigaction(SIGINT, &term, NULL);
	sigaction(SIGTERM, &term, NULL);
	sigaction(SIGCHLD, &child, NULL);
	for (;;)
		pause();
}
