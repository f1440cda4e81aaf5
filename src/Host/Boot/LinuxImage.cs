using System.Buffers.Binary;
using System.Text;
using ActorVmm.Devices;
using ActorVmm.LibVmm;
using ActorVmm.Vcpu;

namespace ActorVmm.Host.Boot;

/// <summary>One entry of the BIOS E820 memory map (ACPI 6.5 §15 "System Address Map Interfaces").</summary>
public readonly record struct E820Entry(ulong Address, ulong Size, uint Type)
{
    public const uint Ram = 1;      // AddressRangeMemory
    public const uint Reserved = 2; // AddressRangeReserved
    public ulong End => Address + Size;
}

/// <summary>
/// A Linux bzImage booted through the 64-bit boot protocol (the kernel's
/// Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"; field offsets from
/// arch/x86/include/uapi/asm/bootparam.h). The loader:
/// <list type="bullet">
/// <item>checks the setup header: "HdrS" at 0x202, protocol version ≥ 2.12 (xloadflags, the 64-bit
/// entry), XLF_KERNEL_64, a bzImage (LOADED_HIGH), setup_sects (0 means 4; the real-mode part is
/// at most 32 KiB and followed by the protected-mode kernel), syssize against the file's length,
/// kernel_alignment a power of two, init_size at least the kernel's size, and that the kernel's
/// run-time area (init_size bytes from its load address) lies in guest RAM;</item>
/// <item>copies the protected-mode kernel (the file after the (setup_sects+1)×512-byte real-mode
/// part) to its load address: pref_address, aligned up to kernel_alignment for a relocatable
/// kernel (never below 1 MiB);</item>
/// <item>writes the zero page (struct boot_params) at <see cref="ZeroPageAddress"/>: all zero, the
/// setup header copied from the image (0x1F1 up to 0x202 + the jump's offset byte at 0x201), then
/// the loader's fields: vid_mode 0xFFFF ("normal"), type_of_loader 0xFF (no assigned id),
/// code32_start = the load address, cmd_line_ptr, ramdisk_image/size, and the E820 map
/// (e820_entries at 0x1E8, the table at 0x2D0);</item>
/// <item>places the initrd page aligned as high as it can go: below initrd_addr_max, below the
/// end of the RAM range the kernel is in (so below the MMIO hole and below 4 GiB), above the
/// kernel's init_size area;</item>
/// <item>enters the kernel at load address + 0x200 in 64-bit mode: a GDT with flat __BOOT_CS
/// (0x10, 64-bit code) and __BOOT_DS (0x18), CS = 0x10, DS = ES = SS = 0x18, the low 4 GiB
/// identity-mapped with 2 MiB pages (the kernel, its init_size area, the zero page and the command
/// line all lie there), interrupts disabled, RSI = the zero page.</item>
/// </list>
/// Boot structures: GDT 0x1000, PML4 0x2000, PDPT 0x3000, page directories 0x4000–0x7FFF (as
/// <see cref="LongModeImage"/>), zero page 0x8000, stack below 0x1F000, command line 0x20000.
/// </summary>
public sealed record LinuxImage(byte[] Kernel, string CommandLine, byte[]? Initrd = null) : BootImage
{
    // Setup header fields (offsets in the file and in the zero page alike).
    public const int SetupSectsOffset = 0x1F1;
    public const int SyssizeOffset = 0x1F4;
    public const int VidModeOffset = 0x1FA;
    public const int JumpOffset = 0x200;
    public const int HeaderMagicOffset = 0x202;
    public const int VersionOffset = 0x206;
    public const int TypeOfLoaderOffset = 0x210;
    public const int LoadflagsOffset = 0x211;
    public const int Code32StartOffset = 0x214;
    public const int RamdiskImageOffset = 0x218;
    public const int RamdiskSizeOffset = 0x21C;
    public const int CmdLinePtrOffset = 0x228;
    public const int InitrdAddrMaxOffset = 0x22C;
    public const int KernelAlignmentOffset = 0x230;
    public const int RelocatableKernelOffset = 0x234;
    public const int XloadflagsOffset = 0x236;
    public const int CmdlineSizeOffset = 0x238;
    public const int PrefAddressOffset = 0x258;
    public const int InitSizeOffset = 0x260;
    /// <summary>The setup header must reach past init_size (0x260, 4 bytes) for protocol 2.12.</summary>
    public const int MinHeaderEnd = 0x264;

    // Zero page fields outside the setup header.
    public const int ExtRamdiskImageOffset = 0x0C0;
    public const int ExtRamdiskSizeOffset = 0x0C4;
    public const int ExtCmdLinePtrOffset = 0x0C8;
    public const int E820EntriesOffset = 0x1E8;
    public const int E820TableOffset = 0x2D0;
    public const int E820MaxEntries = 128;
    public const int E820EntrySize = 20;
    public const int ZeroPageSize = 4096;
    /// <summary>struct boot_params' hdr is followed by a pad up to edd_mbr_sig_buffer at 0x290.</summary>
    public const int SetupHeaderLimit = 0x290;

    public const uint HdrSMagic = 0x5372_6448; // "HdrS"
    public const ushort MinProtocol = 0x020C;  // 2.12: xloadflags
    public const byte LoadedHigh = 0b0000_0001;
    public const ushort XlfKernel64 = 0b0000_0001;
    public const byte TypeOfLoaderUndefined = 0xFF;
    public const ushort VidModeNormal = 0xFFFF;
    public const int SectorSize = 512;
    public const int MaxSetupSects = 63;      // boot sector + setup ≤ 32 KiB
    public const ulong Entry64Offset = 0x200; // startup_64 of the protected-mode kernel

    public const ulong GdtAddress = 0x1000;
    public const ulong ZeroPageAddress = 0x8000;
    public const ulong StackTop = 0x1F000;
    public const ulong CommandLineAddress = 0x20000;
    public const ulong CommandLineLimit = 0x9F000; // below the EBDA
    public const ulong MinLoadAddress = 0x10_0000;
    public const ushort BootCs = 0x10;
    public const ushort BootDs = 0x18;

    /// <summary>The PC's low-memory holes: the EBDA (the last KiB of conventional memory), the BIOS
    /// area 0xF0000–0xFFFFF (where the MP and ACPI tables are), and video memory / option ROMs in
    /// between, which no RAM range covers when there is no firmware image.</summary>
    public const ulong EbdaStart = 0x9FC00;
    public const ulong LowMemoryEnd = 0xA0000;
    public const ulong BiosAreaStart = 0xF0000;
    public const ulong BiosAreaEnd = 0x10_0000;

    /// <summary>The header fields the loader reads.</summary>
    public sealed record SetupHeader(
        int SetupSects, uint Syssize, ushort Version, byte Loadflags, uint InitrdAddrMax, uint KernelAlignment,
        bool Relocatable, ushort Xloadflags, uint CmdlineSize, ulong PrefAddress, uint InitSize, int HeaderEnd)
    {
        /// <summary>Where the protected-mode kernel starts in the file.</summary>
        public int KernelOffset => (SetupSects + 1) * SectorSize;
    }

    /// <summary>Whether a file looks like a Linux kernel with a boot-protocol header ("HdrS" at 0x202).</summary>
    public static bool HasHeaderMagic(ReadOnlySpan<byte> file) =>
        file.Length >= HeaderMagicOffset + 4 && BinaryPrimitives.ReadUInt32LittleEndian(file[HeaderMagicOffset..]) == HdrSMagic;

    /// <summary>Reads and checks the setup header; a kernel this loader cannot boot is a <see cref="BootException"/>.</summary>
    public static SetupHeader ReadHeader(ReadOnlySpan<byte> file)
    {
        if (!HasHeaderMagic(file))
            throw new BootException("not a Linux kernel: no \"HdrS\" boot-protocol magic at offset 0x202");
        var headerEnd = HeaderMagicOffset + file[JumpOffset + 1];
        if (headerEnd < MinHeaderEnd || headerEnd > SetupHeaderLimit)
            throw new BootException($"the setup header ends at 0x{headerEnd:X} (0x202 + the jump at 0x200); a 2.12 header reaches 0x{MinHeaderEnd:X} and none passes 0x{SetupHeaderLimit:X}");
        if (file.Length < headerEnd)
            throw new BootException($"the file is {file.Length} bytes, shorter than its setup header (0x{headerEnd:X})");
        var version = U16(file, VersionOffset);
        if (version < MinProtocol)
            throw new BootException($"boot protocol {version >> 8}.{version & 0xFF:D2} is too old: the 64-bit entry needs 2.12 or later");
        var xloadflags = U16(file, XloadflagsOffset);
        if ((xloadflags & XlfKernel64) == 0)
            throw new BootException($"xloadflags 0x{xloadflags:X} lacks XLF_KERNEL_64: the kernel has no 64-bit entry point");
        var loadflags = file[LoadflagsOffset];
        if ((loadflags & LoadedHigh) == 0)
            throw new BootException("loadflags lacks LOADED_HIGH: a zImage (loaded at 0x10000) is not supported, only bzImage");
        var setupSects = file[SetupSectsOffset] == 0 ? 4 : file[SetupSectsOffset];
        if (setupSects > MaxSetupSects)
            throw new BootException($"setup_sects {setupSects} is above {MaxSetupSects}: the real-mode part would exceed 32 KiB");
        var kernelOffset = (setupSects + 1) * SectorSize;
        if (file.Length <= kernelOffset)
            throw new BootException($"the file is {file.Length} bytes, ending inside its {kernelOffset}-byte real-mode part (setup_sects {setupSects}): no protected-mode kernel follows");
        var syssize = U32(file, SyssizeOffset);
        if (syssize == 0) throw new BootException("syssize is 0: the header does not give the protected-mode kernel's size");
        if ((ulong)syssize * 16 > (ulong)(file.Length - kernelOffset))
            throw new BootException($"syssize says the protected-mode kernel is {(ulong)syssize * 16} bytes, but only {file.Length - kernelOffset} follow the real-mode part: the file is truncated");
        var alignment = U32(file, KernelAlignmentOffset);
        var relocatable = file[RelocatableKernelOffset] != 0;
        if (relocatable && (alignment == 0 || (alignment & (alignment - 1)) != 0))
            throw new BootException($"kernel_alignment 0x{alignment:X} is not a power of two");
        var prefAddress = U64(file, PrefAddressOffset);
        if (!relocatable && prefAddress == 0)
            throw new BootException("the kernel is not relocatable and gives no pref_address to load it at");
        var initSize = U32(file, InitSizeOffset);
        if (initSize < (ulong)syssize * 16)
            throw new BootException($"init_size 0x{initSize:X} is smaller than the protected-mode kernel (0x{(ulong)syssize * 16:X} bytes)");
        return new SetupHeader(setupSects, syssize, version, loadflags, U32(file, InitrdAddrMaxOffset), alignment, relocatable,
            xloadflags, U32(file, CmdlineSizeOffset), prefAddress, initSize, headerEnd);
    }

    /// <summary>Where the protected-mode kernel goes: pref_address (at least 1 MiB), aligned up to
    /// kernel_alignment when the kernel is relocatable (boot.rst: runtime_start = align_up(load_address,
    /// kernel_alignment) for a relocatable kernel, pref_address otherwise).</summary>
    public static ulong LoadAddress(SetupHeader h)
    {
        if (!h.Relocatable) return h.PrefAddress;
        var start = Math.Max(h.PrefAddress, MinLoadAddress);
        if (start > ulong.MaxValue - h.KernelAlignment)
            throw new BootException($"pref_address 0x{h.PrefAddress:X} aligned up to kernel_alignment 0x{h.KernelAlignment:X} is beyond the address space");
        return (start + h.KernelAlignment - 1) & ~((ulong)h.KernelAlignment - 1);
    }

    public override BootState Load(IGuestMemory memory)
    {
        var h = ReadHeader(Kernel);
        var load = LoadAddress(h);
        var ram = memory.Ranges.Where(r => !r.ReadOnly).ToArray();
        var home = ram.FirstOrDefault(r => r.Base.Value <= load && load < r.End);
        Require(home.Size > 0 && load >= MinLoadAddress && load + h.InitSize <= home.End,
            $"the kernel needs init_size 0x{h.InitSize:X} bytes of RAM at 0x{load:X} (pref_address 0x{h.PrefAddress:X}, " +
            $"kernel_alignment 0x{h.KernelAlignment:X}), but guest RAM there ends at 0x{(home.Size > 0 ? home.End : 0):X}");
        var cmdline = Encoding.UTF8.GetBytes(CommandLine);
        Require((ulong)cmdline.Length <= h.CmdlineSize,
            $"the command line is {cmdline.Length} bytes; the kernel takes at most {h.CmdlineSize} (cmdline_size)");
        Require(CommandLineAddress + (ulong)cmdline.Length + 1 <= CommandLineLimit,
            $"the command line is {cmdline.Length} bytes; at most {CommandLineLimit - CommandLineAddress - 1} fit below the EBDA");
        Require(memory.IsMapped(new GuestPhysAddr(0), CommandLineLimit), "guest RAM does not cover the low memory the boot structures need");

        var kernelEnd = load + h.InitSize;
        // syssize paragraphs: the file may carry more after them (a CRC, a signature), not the kernel's.
        memory.Write(new GuestPhysAddr(load), Kernel.AsSpan(h.KernelOffset, (int)(h.Syssize * 16)));

        ulong initrdAddress = 0;
        if (Initrd is not null)
        {
            Require(Initrd.Length > 0, "the initrd is empty");
            initrdAddress = PlaceInitrd(h, home, kernelEnd, (ulong)Initrd.Length);
            memory.Write(new GuestPhysAddr(initrdAddress), Initrd);
        }

        memory.Write(new GuestPhysAddr(CommandLineAddress), [.. cmdline, 0]);
        var zeroPage = ZeroPage(Kernel, h, load, CommandLineAddress, initrdAddress, (uint)(Initrd?.Length ?? 0), E820Map(memory.Ranges));
        memory.Write(new GuestPhysAddr(ZeroPageAddress), zeroPage);
        WriteGdt(memory);
        LongModeImage.WritePageTables(memory);

        // 64-bit boot protocol: RSI = boot_params; the other registers carry nothing.
        var regs = RegisterState.Reset with { Rip = load + Entry64Offset, Rsi = ZeroPageAddress, Rsp = StackTop, Rflags = 0x2 };
        return new BootState(regs, s => s with
        {
            Cs = SegmentState.Long64(BootCs, code: true),
            Ds = SegmentState.Long64(BootDs, code: false),
            Es = SegmentState.Long64(BootDs, code: false),
            Fs = SegmentState.Long64(BootDs, code: false),
            Gs = SegmentState.Long64(BootDs, code: false),
            Ss = SegmentState.Long64(BootDs, code: false),
            Gdt = new TableState(GdtAddress, 4 * 8 - 1),
            Idt = new TableState(0, 0),
            Cr0 = SpecialRegisterState.Cr0Pe | SpecialRegisterState.Cr0Pg | SpecialRegisterState.Cr0Et | SpecialRegisterState.Cr0Ne,
            Cr3 = LongModeImage.Pml4Address,
            Cr4 = SpecialRegisterState.Cr4Pae,
            Efer = SpecialRegisterState.EferLme | SpecialRegisterState.EferLma,
        });
    }

    /// <summary>The initrd's address: page aligned, as high as possible below min(initrd_addr_max + 1,
    /// the end of the kernel's RAM range, 4 GiB) and not below the kernel's init_size area.</summary>
    public static ulong PlaceInitrd(SetupHeader h, GuestRange home, ulong kernelEnd, ulong size)
    {
        var ceiling = Math.Min(Math.Min((ulong)h.InitrdAddrMax + 1, home.End), 1UL << 32);
        var address = ceiling >= size ? (ceiling - size) & ~0xFFFUL : 0;
        if (ceiling < size || address < kernelEnd)
            throw new BootException($"the initrd of {size} bytes does not fit between the kernel's end 0x{kernelEnd:X} and " +
                                    $"0x{ceiling:X} (the lower of initrd_addr_max 0x{h.InitrdAddrMax:X} + 1 and the end of RAM 0x{home.End:X})");
        return address;
    }

    /// <summary>struct boot_params: zero, the image's setup header, the loader's fields and the E820 map.</summary>
    public static byte[] ZeroPage(ReadOnlySpan<byte> kernel, SetupHeader h, ulong load, ulong cmdline, ulong initrd, uint initrdSize,
        IReadOnlyList<E820Entry> e820)
    {
        if (e820.Count > E820MaxEntries) throw new BootException($"{e820.Count} E820 entries; the zero page holds {E820MaxEntries}");
        var zp = new byte[ZeroPageSize];
        kernel[SetupSectsOffset..h.HeaderEnd].CopyTo(zp.AsSpan(SetupSectsOffset));
        W16(zp, VidModeOffset, VidModeNormal);
        zp[TypeOfLoaderOffset] = TypeOfLoaderUndefined;
        W32(zp, Code32StartOffset, (uint)load);
        W32(zp, CmdLinePtrOffset, (uint)cmdline);
        W32(zp, ExtCmdLinePtrOffset, (uint)(cmdline >> 32));
        W32(zp, RamdiskImageOffset, (uint)initrd);
        W32(zp, RamdiskSizeOffset, initrdSize);
        W32(zp, ExtRamdiskImageOffset, (uint)(initrd >> 32));
        W32(zp, ExtRamdiskSizeOffset, 0);
        zp[E820EntriesOffset] = (byte)e820.Count;
        for (var i = 0; i < e820.Count; i++)
        {
            var at = E820TableOffset + i * E820EntrySize;
            BinaryPrimitives.WriteUInt64LittleEndian(zp.AsSpan(at), e820[i].Address);
            BinaryPrimitives.WriteUInt64LittleEndian(zp.AsSpan(at + 8), e820[i].Size);
            W32(zp, at + 16, e820[i].Type);
        }
        return zp;
    }

    /// <summary>
    /// The E820 map a PC BIOS would report for this guest's memory, in address order:
    /// conventional memory up to the EBDA, the EBDA and the BIOS area 0xF0000–0xFFFFF (the MP and
    /// ACPI tables) reserved (0xA0000–0xEFFFF, video memory and option ROMs, is in no range: a hole),
    /// RAM from 1 MiB, read-only (firmware) ranges reserved; in the MMIO hole, the pages the
    /// platform decodes at fixed addresses (the IOAPIC, the local APIC) and KVM's real-mode TSS and
    /// identity-map pages reserved. The rest of the hole is left out of the map, as a PC leaves its
    /// PCI window: an OS places BARs in such gaps (Linux's e820__setup_pci_gap).
    /// </summary>
    public static IReadOnlyList<E820Entry> E820Map(IReadOnlyList<GuestRange> ranges)
    {
        var map = new List<E820Entry>();
        foreach (var r in ranges)
        {
            if (r.ReadOnly)
            {
                map.Add(new E820Entry(r.Base.Value, r.Size, E820Entry.Reserved));
                continue;
            }
            var start = r.Base.Value;
            var end = r.End;
            if (start < BiosAreaEnd)
            {
                // Below 1 MiB a RAM range gives only conventional memory (up to the EBDA).
                if (start < EbdaStart) map.Add(new E820Entry(start, Math.Min(end, EbdaStart) - start, E820Entry.Ram));
                start = BiosAreaEnd;
            }
            if (end > start) map.Add(new E820Entry(start, end - start, E820Entry.Ram));
        }
        map.Add(new E820Entry(EbdaStart, LowMemoryEnd - EbdaStart, E820Entry.Reserved));
        map.Add(new E820Entry(BiosAreaStart, BiosAreaEnd - BiosAreaStart, E820Entry.Reserved));
        map.Add(new E820Entry(Platform.IoApicBase, Platform.IoApicLength, E820Entry.Reserved));
        map.Add(new E820Entry(Platform.LocalApicBase, 0x1000, E820Entry.Reserved));
        map.Add(new E820Entry(VmHandle.IdentityMapAddress, VmHandle.TssAddress + 3 * 0x1000 - VmHandle.IdentityMapAddress, E820Entry.Reserved));
        // A firmware range already reserved covers what it overlaps; keep the map free of overlaps.
        var sorted = map.OrderBy(e => e.Address).ThenBy(e => e.Type).ToList();
        var result = new List<E820Entry>();
        foreach (var e in sorted)
        {
            if (result.Count > 0 && result[^1].End > e.Address)
            {
                if (result[^1].End >= e.End) continue;
                result.Add(e with { Address = result[^1].End, Size = e.End - result[^1].End });
            }
            else result.Add(e);
        }
        return result;
    }

    /// <summary>The boot GDT: null, null, __BOOT_CS (0x10: 64-bit code), __BOOT_DS (0x18: flat data);
    /// the accessed bit set, as the descriptor caches the vcpu starts with say.</summary>
    public static void WriteGdt(IGuestMemory memory)
    {
        ulong[] gdt =
        [
            0,
            0,
            0x00AF_9B00_0000_FFFF, // 64-bit code: P, DPL 0, execute/read, accessed, L, G
            0x00CF_9300_0000_FFFF, // data: P, DPL 0, read/write, accessed, D/B, G
        ];
        for (var i = 0; i < gdt.Length; i++) memory.WriteUInt64(new GuestPhysAddr(GdtAddress + (ulong)i * 8), gdt[i]);
    }

    private static ushort U16(ReadOnlySpan<byte> b, int at) => BinaryPrimitives.ReadUInt16LittleEndian(b[at..]);
    private static uint U32(ReadOnlySpan<byte> b, int at) => BinaryPrimitives.ReadUInt32LittleEndian(b[at..]);
    private static ulong U64(ReadOnlySpan<byte> b, int at) => BinaryPrimitives.ReadUInt64LittleEndian(b[at..]);
    private static void W16(byte[] b, int at, ushort v) => BinaryPrimitives.WriteUInt16LittleEndian(b.AsSpan(at), v);
    private static void W32(byte[] b, int at, uint v) => BinaryPrimitives.WriteUInt32LittleEndian(b.AsSpan(at), v);
}
