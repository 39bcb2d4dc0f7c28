#include "faults.h"

#include <unistd.h>

void udrv_fault_spin(void)
{
    volatile unsigned long n = 0;
    for (;;)
        n++;
}

void udrv_fault_block(int fd)
{
    char c;
    for (;;)
        if (read(fd, &c, 1) > 0)
            continue;   /* nobody writes the pipe: the read blocks for ever */
}

void udrv_fault_segv(void)
{
    *(volatile int *)0 = 1;
}
