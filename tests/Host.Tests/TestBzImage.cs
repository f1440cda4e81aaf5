using System.Buffers.Binary;
using System.Text;

namespace ActorVmm.Host.Tests;

/// <summary>
/// A synthetic Linux bzImage for loader tests: a boot sector and setup sectors holding a setup
/// header (Documentation/arch/x86/boot.rst) with the fields given, followed by the protected-mode
/// "kernel" (a byte pattern, or the code given) and optional trailing bytes after syssize.
/// </summary>
public static class TestBzImage
{
    public sealed record Fields
    {
        public byte SetupSects { get; init; } = 4;
        public byte JumpOffset { get; init; } = 0x6A; // header ends at 0x26C (protocol 2.15)
        public ushort Version { get; init; } = 0x020F;
        public byte Loadflags { get; init; } = 0x01; // LOADED_HIGH
        public ushort Xloadflags { get; init; } = 0b11; // XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
        public uint? Syssize { get; init; }             // default: the kernel's size in paragraphs
        public uint InitrdAddrMax { get; init; } = 0x7FFF_FFFF;
        public uint KernelAlignment { get; init; } = 0x20_0000;
        public byte Relocatable { get; init; } = 1;
        public uint CmdlineSize { get; init; } = 2047;
        public ulong PrefAddress { get; init; } = 0x100_0000;
        public uint InitSize { get; init; } = 0x40_0000;
        public int KernelBytes { get; init; } = 0x1000;
        public int TrailingBytes { get; init; }
        public byte[]? Code { get; init; }
        public bool Magic { get; init; } = true;
    }

    public static byte[] Build(Fields? fields = null)
    {
        var f = fields ?? new Fields();
        var setup = ((f.SetupSects == 0 ? 4 : f.SetupSects) + 1) * 512;
        var kernelBytes = f.Code is { } code ? (code.Length + 15) & ~15 : f.KernelBytes;
        var file = new byte[setup + kernelBytes + f.TrailingBytes];
        file[0x1F1] = f.SetupSects;
        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(0x1F4), f.Syssize ?? (uint)(kernelBytes / 16));
        BinaryPrimitives.WriteUInt16LittleEndian(file.AsSpan(0x1FE), 0xAA55);
        file[0x200] = 0xEB;
        file[0x201] = f.JumpOffset;
        if (f.Magic) Encoding.ASCII.GetBytes("HdrS").CopyTo(file, 0x202);
        BinaryPrimitives.WriteUInt16LittleEndian(file.AsSpan(0x206), f.Version);
        BinaryPrimitives.WriteUInt16LittleEndian(file.AsSpan(0x20E), 0x1234);   // kernel_version (read only)
        file[0x211] = f.Loadflags;
        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(0x214), 0x10_0000); // code32_start
        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(0x22C), f.InitrdAddrMax);
        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(0x230), f.KernelAlignment);
        file[0x234] = f.Relocatable;
        file[0x235] = 21; // min_alignment
        BinaryPrimitives.WriteUInt16LittleEndian(file.AsSpan(0x236), f.Xloadflags);
        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(0x238), f.CmdlineSize);
        BinaryPrimitives.WriteUInt64LittleEndian(file.AsSpan(0x258), f.PrefAddress);
        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(0x260), f.InitSize);
        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(0x264), 0x190);     // handover_offset (read only)
        BinaryPrimitives.WriteUInt32LittleEndian(file.AsSpan(0x268), 0x5A5A);    // kernel_info_offset
        for (var i = 0x26C; i < setup; i++) file[i] = 0xCC;                       // the rest of the setup code
        if (f.Code is { } c) c.CopyTo(file, setup);
        else for (var i = 0; i < kernelBytes; i++) file[setup + i] = (byte)(i * 7 + 1);
        for (var i = 0; i < f.TrailingBytes; i++) file[setup + kernelBytes + i] = 0xEE;
        return file;
    }
}
