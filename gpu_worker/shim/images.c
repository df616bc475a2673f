/* gpulab shim: the size of a module image, so that it travels whole (the driver API
 * passes images by pointer only). PTX: the NUL-terminated text; cubin: the end of the last
 * ELF section or header table; fatbin: header size + fat size; a fatbin wrapper is followed. */
#include "gl_shim.h"

#define FATBIN_MAGIC 0xBA55ED50u
#define FATBIN_WRAPPER_MAGIC 0x466243B1u

const void *gl_image_data(const void *image, size_t *size)
{
    const unsigned char *p = image;
    uint32_t magic;
    memcpy(&magic, p, 4);
    if (magic == FATBIN_WRAPPER_MAGIC) {
        const void *inner;
        memcpy(&inner, p + 8, sizeof inner);
        return inner ? gl_image_data(inner, size) : NULL;
    }
    if (magic == FATBIN_MAGIC) {
        uint16_t hsize; uint64_t fsize;
        memcpy(&hsize, p + 6, 2);
        memcpy(&fsize, p + 8, 8);
        *size = (size_t)hsize + (size_t)fsize;
        return image;
    }
    if (p[0] == 0x7f && p[1] == 'E' && p[2] == 'L' && p[3] == 'F') {
        if (p[4] != 2) return NULL; /* only 64-bit cubins exist for current GPUs */
        uint64_t shoff, phoff; uint16_t shentsize, shnum, phentsize, phnum;
        memcpy(&phoff, p + 0x20, 8); memcpy(&shoff, p + 0x28, 8);
        memcpy(&phentsize, p + 0x36, 2); memcpy(&phnum, p + 0x38, 2);
        memcpy(&shentsize, p + 0x3A, 2); memcpy(&shnum, p + 0x3C, 2);
        uint64_t end = 0x40;
        if (shoff + (uint64_t)shnum * shentsize > end) end = shoff + (uint64_t)shnum * shentsize;
        if (phoff + (uint64_t)phnum * phentsize > end) end = phoff + (uint64_t)phnum * phentsize;
        for (uint16_t i = 0; i < shnum; i++) {
            const unsigned char *sh = p + shoff + (uint64_t)i * shentsize;
            uint32_t type; uint64_t off, sz;
            memcpy(&type, sh + 4, 4); memcpy(&off, sh + 0x18, 8); memcpy(&sz, sh + 0x20, 8);
            if (type != 8 /* SHT_NOBITS */ && off + sz > end) end = off + sz;
        }
        *size = (size_t)end;
        return image;
    }
    /* PTX: NUL-terminated text */
    *size = strlen((const char *)image);
    return *size ? image : NULL;
}
