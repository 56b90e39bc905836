/**
 * sha256 of the files named on the command line, with the threads and code
 * `bam upcycle` hashes seeds with: the upcycle benchmark's hashing baseline.
 */
import { HASH_THREADS, hashFiles } from "../../src/upcycle/hash-seeds.js";

await hashFiles(process.argv.slice(2), HASH_THREADS);
