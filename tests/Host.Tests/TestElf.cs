using System.Buffers.Binary;

namespace ActorVmm.Testing;

/// <summary>Builds minimal ELF32 x86 executables (one PT_LOAD) for loader tests and test kernels.</summary>
public static class TestElf
{
    public const int HeaderSize = 52;
    public const int ProgramHeaderSize = 32;
    public const int SegmentOffset = HeaderSize + ProgramHeaderSize;

    /// <summary>A multiboot header (magic, flags, checksum): 12 bytes to put first in the code.</summary>
    public static byte[] MultibootHeader(uint flags = 0b11)
    {
        var h = new byte[12];
        BinaryPrimitives.WriteUInt32LittleEndian(h, 0x1BAD_B002);
        BinaryPrimitives.WriteUInt32LittleEndian(h.AsSpan(4), flags);
        BinaryPrimitives.WriteUInt32LittleEndian(h.AsSpan(8), unchecked(0u - 0x1BAD_B002u - flags));
        return h;
    }

    /// <summary>An ELF32 EXEC whose one segment holds <paramref name="segment"/> at
    /// <paramref name="address"/> (plus <paramref name="bss"/> zero bytes).</summary>
    public static byte[] Build(byte[] segment, uint address, uint entry, uint bss = 0)
    {
        var file = new byte[SegmentOffset + segment.Length];
        var e = file.AsSpan();
        e[0] = 0x7F; e[1] = (byte)'E'; e[2] = (byte)'L'; e[3] = (byte)'F';
        e[4] = 1; e[5] = 1; e[6] = 1;
        BinaryPrimitives.WriteUInt16LittleEndian(e[16..], 2);    // ET_EXEC
        BinaryPrimitives.WriteUInt16LittleEndian(e[18..], 3);    // EM_386
        BinaryPrimitives.WriteUInt32LittleEndian(e[20..], 1);
        BinaryPrimitives.WriteUInt32LittleEndian(e[24..], entry);
        BinaryPrimitives.WriteUInt32LittleEndian(e[28..], HeaderSize); // e_phoff
        BinaryPrimitives.WriteUInt16LittleEndian(e[40..], HeaderSize);
        BinaryPrimitives.WriteUInt16LittleEndian(e[42..], ProgramHeaderSize);
        BinaryPrimitives.WriteUInt16LittleEndian(e[44..], 1);
        var p = e[HeaderSize..];
        BinaryPrimitives.WriteUInt32LittleEndian(p, 1);           // PT_LOAD
        BinaryPrimitives.WriteUInt32LittleEndian(p[4..], SegmentOffset);
        BinaryPrimitives.WriteUInt32LittleEndian(p[8..], address);
        BinaryPrimitives.WriteUInt32LittleEndian(p[12..], address);
        BinaryPrimitives.WriteUInt32LittleEndian(p[16..], (uint)segment.Length);
        BinaryPrimitives.WriteUInt32LittleEndian(p[20..], (uint)segment.Length + bss);
        BinaryPrimitives.WriteUInt32LittleEndian(p[24..], 7);
        BinaryPrimitives.WriteUInt32LittleEndian(p[28..], 4);
        segment.CopyTo(file, SegmentOffset);
        return file;
    }
}
