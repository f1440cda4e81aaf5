using System.Buffers.Binary;

namespace ActorVmm.Host.Boot;

/// <summary>A loadable segment of an ELF executable: where it goes and what it holds.</summary>
public sealed record ElfSegment(ulong PhysicalAddress, ulong FileOffset, ulong FileSize, ulong MemorySize);

/// <summary>
/// The parts of an x86 ELF executable (ELF32 or ELF64, little-endian, EXEC) a loader needs:
/// entry point and PT_LOAD segments. Every offset and size is checked against the file, so a
/// malformed image is a <see cref="BootException"/>, never an out-of-range read.
/// </summary>
public sealed record ElfImage(bool Is64, ulong Entry, IReadOnlyList<ElfSegment> Segments)
{
    private const uint PtLoad = 1;
    private const ushort EtExec = 2;
    private const ushort Em386 = 3;
    private const ushort EmX8664 = 62;
    public const int MaxSegments = 64;

    public static bool HasElfMagic(ReadOnlySpan<byte> file) =>
        file.Length >= 4 && file[0] == 0x7F && file[1] == (byte)'E' && file[2] == (byte)'L' && file[3] == (byte)'F';

    public static ElfImage Parse(ReadOnlySpan<byte> file, string what)
    {
        if (!HasElfMagic(file)) throw new BootException($"{what} is not an ELF file");
        if (file.Length < 52) throw new BootException($"{what}: ELF header is truncated");
        var cls = file[4];
        if (cls is not (1 or 2)) throw new BootException($"{what}: unknown ELF class {cls}");
        if (file[5] != 1) throw new BootException($"{what}: not a little-endian ELF");
        var is64 = cls == 2;
        if (is64 && file.Length < 64) throw new BootException($"{what}: ELF64 header is truncated");
        var type = U16(file, 16);
        var machine = U16(file, 18);
        if (type != EtExec) throw new BootException($"{what}: ELF type {type} is not an executable");
        if (machine is not (Em386 or EmX8664)) throw new BootException($"{what}: ELF machine {machine} is not x86");

        ulong entry, phoff;
        int phentsize, phnum;
        if (is64)
        {
            entry = U64(file, 24);
            phoff = U64(file, 32);
            phentsize = U16(file, 54);
            phnum = U16(file, 56);
        }
        else
        {
            entry = U32(file, 24);
            phoff = U32(file, 28);
            phentsize = U16(file, 42);
            phnum = U16(file, 44);
        }
        var minEntry = is64 ? 56 : 32;
        if (phnum == 0) throw new BootException($"{what}: no program headers");
        if (phnum > MaxSegments) throw new BootException($"{what}: {phnum} program headers (at most {MaxSegments})");
        if (phentsize < minEntry) throw new BootException($"{what}: program header size {phentsize} is too small");
        if (phoff > (ulong)file.Length || (ulong)phnum * (ulong)phentsize > (ulong)file.Length - phoff)
            throw new BootException($"{what}: program headers lie outside the file");

        var segments = new List<ElfSegment>();
        for (var i = 0; i < phnum; i++)
        {
            var ph = file.Slice((int)phoff + i * phentsize, phentsize);
            if (U32(ph, 0) != PtLoad) continue;
            ulong offset, paddr, filesz, memsz;
            if (is64)
            {
                offset = U64(ph, 8);
                paddr = U64(ph, 24);
                filesz = U64(ph, 32);
                memsz = U64(ph, 40);
            }
            else
            {
                offset = U32(ph, 4);
                paddr = U32(ph, 12);
                filesz = U32(ph, 16);
                memsz = U32(ph, 20);
            }
            if (filesz > memsz) throw new BootException($"{what}: segment {i} has more file bytes than memory bytes");
            if (offset > (ulong)file.Length || filesz > (ulong)file.Length - offset)
                throw new BootException($"{what}: segment {i} lies outside the file");
            if (paddr + memsz < paddr) throw new BootException($"{what}: segment {i} wraps the address space");
            if (memsz > 0) segments.Add(new ElfSegment(paddr, offset, filesz, memsz));
        }
        if (segments.Count == 0) throw new BootException($"{what}: no loadable segments");
        for (var i = 0; i < segments.Count; i++)
        for (var j = i + 1; j < segments.Count; j++)
        {
            var a = segments[i];
            var b = segments[j];
            if (a.PhysicalAddress < b.PhysicalAddress + b.MemorySize && b.PhysicalAddress < a.PhysicalAddress + a.MemorySize)
                throw new BootException($"{what}: loadable segments overlap at 0x{Math.Max(a.PhysicalAddress, b.PhysicalAddress):X}");
        }
        return new ElfImage(is64, entry, segments);
    }

    private static ushort U16(ReadOnlySpan<byte> b, int at) => BinaryPrimitives.ReadUInt16LittleEndian(b[at..]);
    private static uint U32(ReadOnlySpan<byte> b, int at) => BinaryPrimitives.ReadUInt32LittleEndian(b[at..]);
    private static ulong U64(ReadOnlySpan<byte> b, int at) => BinaryPrimitives.ReadUInt64LittleEndian(b[at..]);
}
