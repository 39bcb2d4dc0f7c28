/* Faults of the class only a process boundary survives (udrv inject worker spin|hang): a busy
 * loop and a blocking call that never return, in C, with the interpreter lock released, as a
 * bug in a C ring would be. Used by the worker's fault injection, never by a datapath. */
#ifndef UDRV_FAULTS_H
#define UDRV_FAULTS_H

void udrv_fault_spin(void);
void udrv_fault_block(int fd);
void udrv_fault_segv(void);

#endif
