/* getaddrinfo(NAME) for IPv4, printing how many addresses came back: built with musl-gcc,
 * it is an Alpine-style stub resolver (musl before 1.2.4 never retries over TCP). */
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

int main(int argc, char **argv)
{
	struct addrinfo hints, *res, *p;
	int rc, n = 0;

	if (argc != 2)
		return 64;
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_INET;
	hints.ai_socktype = SOCK_STREAM;
	rc = getaddrinfo(argv[1], NULL, &hints, &res);
	if (rc) {
		fprintf(stderr, "%s\n", gai_strerror(rc));
		return 2;
	}
	for (p = res; p; p = p->ai_next)
		n++;
	printf("%d\n", n);
	freeaddrinfo(res);
	return 0;
}
